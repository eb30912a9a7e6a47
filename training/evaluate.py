"""``training evaluate``: run bundles on a labelled DICOM set and measure them.

The images go through :class:`ai.inference.Analyzer`, the object the node itself calls, so
the probabilities measured here are the probabilities the node reports on the same files
(``predictions.csv`` can be compared with the node's output value by value). Positive calls
use each bundle's own operating thresholds (``Finding.positive``), not a threshold chosen
here.

Pipeline: :func:`load_labelled_set` (labels matched to the DICOM tree, mismatches counted)
-> :func:`predict` (batched, an undecodable image is skipped and counted, never fatal) ->
:func:`evaluate_predictions` (one :class:`ModelReport` per bundle, dispatched on the bundle's
task through :data:`TASK_EVALUATORS`) -> :mod:`training.report` writes the files.

Detection bundles plug in through :data:`TASK_EVALUATORS`: their evaluator needs the
box truth (``--boxes``, a YOLO JSON map; class names from a ``classes.txt`` beside it, else
the bundle's labels) and reports per-class Images, Instances, P, R, mAP50, mAP50-95 and
FROC from :mod:`ai.reference.metrics_detection`; a FROC plot per class goes into ``curves/``.

Nothing identifying leaves this module: reports and logs carry SOP/Study Instance UIDs and
counts, never patient names, IDs or file paths inside the data tree.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ai.batches import analyse_isolating
from ai.bundle.metadata import BundleMetadata, read_metadata
from ai.codes import normalise_label
from ai.reference.dicom_files import index_dicom_tree
from ai.reference.evaluate import label_metrics
from ai.reference.labels import normalise_path, read_classification_labels
from ai.reference.localisation import (
    LocalisationCollector,
    LocationsError,
    locations_beside,
    read_locations,
)
from ai.reference.matching import match_labels
from ai.selection import screening_reason
from ai.types import Analyzer, ImageResult, ModelIdentity, PixelDataError
from training.errors import TrainingError
from training.report import plot_froc_curves, write_evaluation
from training.results import EvaluationReport, ModelReport, Prediction

logger = logging.getLogger(__name__)



class EvaluateError(TrainingError, ValueError):
    """The evaluation cannot run as asked (no labelled images, unknown task, ...).

    Named after the ``training evaluate`` command, not ``EvaluationError``: that name is the
    node's scheduled-job error (:mod:`dicom_node.evaluation.errors`), recorded in run rows.
    """


# --------------------------------------------------------------------------------------------
# Labelled data


@dataclass(frozen=True)
class LabelledImage:
    """One DICOM file with its reference standard: label -> 1, 0 or None (not assessed)."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    truth: Mapping[str, int | None]
    patient_key: str = ""  # only ever counted, never written


@dataclass
class LabelledSet:
    """The images to evaluate, the labels they carry, and what was left out (counts only)."""

    images: list[LabelledImage]
    label_names: list[str]
    mismatches: dict[str, int] = field(default_factory=dict)
    labels_file: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "labels_file": self.labels_file,
            "labelled_images": len(self.images),
            "studies": len({i.study_instance_uid for i in self.images}),
            "patients": len({i.patient_key for i in self.images if i.patient_key}),
            "labels": list(self.label_names),
            "mismatches": dict(self.mismatches),
        }


def load_labelled_set(
    data_dir: Path, labels_csv: Path, *, progress: Callable[[int], None] | None = None
) -> LabelledSet:
    """Match ``labels_csv`` to the DICOM files under ``data_dir`` (:mod:`ai.reference.labels`).

    Mismatches (labels without images, images without labels, unknown classes, unreadable
    or duplicate files) are counted in the result and logged as counts; the evaluation goes
    on with the matched images and fails only when none matched.
    """
    data_dir, labels_csv = Path(data_dir), Path(labels_csv)
    if not data_dir.is_dir():
        raise EvaluateError(f'--data "{data_dir}" is not a folder')
    if not labels_csv.is_file():
        raise EvaluateError(f'--labels "{labels_csv}" is not a file')
    labels = read_classification_labels(labels_csv)
    match = match_labels(index_dicom_tree(data_dir, progress=progress), labels)
    if match.problems:  # counts only: the detailed report names relative paths
        logger.warning("%s: %d matched; mismatches %s", labels_csv.name, len(match.matched),
                       match.problems)  # fmt: skip
    if not match.matched:
        raise EvaluateError(
            f"no DICOM file under {data_dir} matches a row of {labels_csv.name} "
            f"(labels keyed by {labels.key}; mismatches {match.problems})"
        )
    names = list(match.label_names)
    images = [
        LabelledImage(
            m.image.path,
            m.image.sop_instance_uid,
            m.image.study_instance_uid,
            dict(zip(names, m.targets, strict=True)),
            m.patient_key,
        )
        for m in match.matched
    ]
    mismatches = {k.replace(" ", "_"): v for k, v in match.problems.items()}
    return LabelledSet(images, names, mismatches, labels_csv.name)


# --------------------------------------------------------------------------------------------
# Predictions through the node's Analyzer


@dataclass
class PredictionSet:
    """Everything the models said, plus what could not be analysed (reason -> count)."""

    predictions: list[Prediction]
    results: list[tuple[LabelledImage, ImageResult]]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.results)


def _read(image: LabelledImage) -> Dataset:
    try:
        return pydicom.dcmread(image.path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise PixelDataError(f"unreadable DICOM ({type(exc).__name__})") from exc


def _analyse_chunk(
    analyzer: Analyzer, chunk: list[tuple[LabelledImage, Dataset]], skipped: Counter
) -> list[tuple[LabelledImage, ImageResult]]:
    """Analyse a batch; an image whose pixels cannot be used is skipped and counted."""
    out: list[tuple[LabelledImage, ImageResult]] = []
    outcomes = analyse_isolating(analyzer, [ds for _, ds in chunk])
    for (image, _), outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, PixelDataError):
            skipped["undecodable pixel data"] += 1
            logger.warning("SOP Instance %s: pixel data cannot be analysed; skipped",
                           image.sop_instance_uid)  # fmt: skip
        else:
            out.append((image, outcome))
    return out


def predict(
    analyzer: Analyzer,
    images: Sequence[LabelledImage],
    *,
    batch_size: int = 8,
    all_images: bool = False,
    progress: Callable[[int], None] | None = None,
    reader: Callable[[LabelledImage], Dataset] | None = None,
    on_result: Callable[[LabelledImage, ImageResult], None] | None = None,
) -> PredictionSet:
    """Run ``analyzer`` on ``images`` in batches; returns the per-label predictions.

    Images the node would not analyse (lateral, CT, ...) are skipped and counted unless
    ``all_images``; unreadable or undecodable files are skipped and counted. ``reader``
    (default: ``pydicom.dcmread`` of ``image.path``) is for tests without files.
    ``on_result`` sees each result while its heatmaps are alive (the localisation figures);
    they are dropped afterwards, so a large set does not keep a source-size map per finding.
    """
    read = reader or _read
    skipped: Counter[str] = Counter()
    results: list[tuple[LabelledImage, ImageResult]] = []
    chunk: list[tuple[LabelledImage, Dataset]] = []
    for index, image in enumerate(images):
        try:
            ds = read(image)
            reason = None if all_images else screening_reason(ds)
        except PixelDataError as exc:
            reason = str(exc)
        if reason:
            skipped[reason] += 1
        else:
            chunk.append((image, ds))
        if len(chunk) >= batch_size or (index == len(images) - 1 and chunk):
            done = _analyse_chunk(analyzer, chunk, skipped)
            for image, result in done if on_result else ():
                on_result(image, result)  # type: ignore[misc]
                result.finding_heatmaps.clear()
                result.heatmap = None
            results.extend(done)
            chunk = []
        if progress:
            progress(1)
    return PredictionSet(_flatten(results), results, dict(skipped))


def _flatten(results: Iterable[tuple[LabelledImage, ImageResult]]) -> list[Prediction]:
    rows = []
    for image, result in results:
        truth = {normalise_label(k): v for k, v in image.truth.items()}
        for finding in result.findings:
            rows.append(
                Prediction(
                    model=finding.model,
                    sop_instance_uid=image.sop_instance_uid,
                    label=finding.label,
                    probability=float(finding.probability),
                    threshold=float(finding.threshold),
                    positive=bool(finding.positive),
                    truth=truth.get(normalise_label(finding.label)),
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Metrics


def _evaluate_classification(
    identity: ModelIdentity,
    meta: dict[str, Any],
    predictions: Sequence[Prediction],
    context: EvaluationContext,
) -> ModelReport:
    by_label: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_label.setdefault(p.label, []).append(p)
    report = ModelReport(identity, meta, [])
    for label in meta.get("labels", []) or list(by_label):
        name = label["name"] if isinstance(label, dict) else str(label)
        rows = [p for p in by_label.get(name, []) if p.truth is not None]
        if normalise_label(name) not in context.truth_labels:
            report.not_evaluated[name] = "no reference column for this label in the labels file"
            continue
        if not rows:
            report.not_evaluated[name] = "no image with a reference value for this label"
            continue
        thresholds = {p.threshold for p in rows}
        if len(thresholds) != 1:
            raise EvaluateError(f'label "{name}": several thresholds {sorted(thresholds)}')
        truth = np.asarray([int(p.truth or 0) for p in rows])
        scores = np.asarray([p.probability for p in rows])
        metrics = label_metrics(name, rows[0].threshold, truth, scores, n_boot=context.n_boot,
                                seed=context.seed)  # fmt: skip
        calls = np.asarray([p.positive for p in rows])
        if not np.array_equal(calls, scores >= rows[0].threshold):
            raise EvaluateError(f'label "{name}": the model\'s positive calls do not follow '
                                  "probability >= threshold")  # fmt: skip
        report.labels.append(metrics)
    return report


def _evaluate_detection(
    identity: ModelIdentity,
    meta: dict[str, Any],
    predictions: Sequence[Prediction],
    context: EvaluationContext,
) -> ModelReport:
    """Per-class Images, Instances, P, R, mAP50, mAP50-95 and FROC from ``ai.reference.metrics_detection``
    (``evaluate_detection`` returns ``{"classes": [...rows...], "froc": {...}, ...}``)."""
    module = _detection_metrics_module()
    if module is None or not hasattr(module, "evaluate_detection"):
        raise EvaluateError(
            f'Bundle "{identity.name}" {identity.version}: task "detection" cannot be evaluated '
            "yet: ai.reference.metrics_detection (mAP50, mAP50-95, FROC) is not available"
        )
    if context.boxes is None:
        raise EvaluateError(f'Bundle "{identity.name}": detection needs --boxes (YOLO JSON)')
    results = [(img, res) for img, res in context.results]
    try:
        detection = module.evaluate_detection(results, context.boxes, meta.get("labels", []),
                                              model=identity, classes=context.box_classes)  # fmt: skip
    except ValueError as exc:
        raise EvaluateError(f'Bundle "{identity.name}": --boxes: {exc}') from exc
    return ModelReport(identity, meta, [], detection=detection)


def _detection_metrics_module() -> Any:
    try:
        return importlib.import_module("ai.reference.metrics_detection")
    except ModuleNotFoundError:
        return None


@dataclass
class EvaluationContext:
    """What a task evaluator may need beyond its own predictions."""

    truth_labels: set[str]
    results: list[tuple[LabelledImage, ImageResult]]
    boxes: Mapping[str, Any] | None = None
    n_boot: int = 2000
    seed: int = 0
    box_classes: list[str] | None = None  # the box map's class names (classes.txt)


TaskEvaluator = Callable[
    [ModelIdentity, dict[str, Any], Sequence[Prediction], EvaluationContext], ModelReport
]
TASK_EVALUATORS: dict[str, TaskEvaluator] = {
    "classification": _evaluate_classification,
    "detection": _evaluate_detection,
}


def check_task_supported(metadata: BundleMetadata) -> None:
    """Fail early (before loading weights) for a task this release cannot evaluate."""
    if metadata.task not in TASK_EVALUATORS:
        raise EvaluateError(f'Bundle "{metadata.name}": task "{metadata.task}" is unknown')
    if metadata.task == "detection" and _detection_metrics_module() is None:
        raise EvaluateError(
            f'Bundle "{metadata.name}" {metadata.version}: task "detection" cannot be evaluated '
            "yet: ai.reference.metrics_detection (mAP50, mAP50-95, FROC) is not available"
        )


def bundle_summary(directory: Path) -> dict[str, Any]:
    """Model identity for the report: what a safety officer needs to name the exact model."""
    meta = read_metadata(directory)
    return {
        "name": meta.name,
        "version": meta.version,
        "device_uid": meta.device_uid,
        "task": meta.task,
        "demo": meta.demo,
        "network": meta.network.name,
        "weights_sha256": meta.weights_sha256,
        "labels": [label.to_json() for label in meta.labels],
        "input": meta.input.to_json(),
        "bundle": str(directory),
    }


def evaluate_predictions(
    predictions: PredictionSet,
    labelled: LabelledSet,
    model_meta: Mapping[str, dict[str, Any]] | None = None,
    *,
    models: Sequence[ModelIdentity] | None = None,
    boxes: Mapping[str, Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    box_classes: Sequence[str] | None = None,
) -> EvaluationReport:
    """Figures per model and label; ``model_meta`` maps device UID -> :func:`bundle_summary`."""
    if not predictions.results:
        raise EvaluateError("no image could be analysed: nothing to evaluate")
    context = EvaluationContext(
        truth_labels={normalise_label(n) for n in labelled.label_names},
        results=predictions.results,
        boxes=boxes,
        n_boot=n_boot,
        seed=seed,
        box_classes=list(box_classes) if box_classes is not None else None,
    )
    identities = list(models or _identities(predictions.predictions))
    reports = []
    for identity in identities:
        meta = dict((model_meta or {}).get(identity.device_uid) or _meta_from(identity))
        own = [p for p in predictions.predictions if p.model.device_uid == identity.device_uid]
        evaluator = TASK_EVALUATORS.get(identity.task)
        if evaluator is None:
            raise EvaluateError(f'Model "{identity.name}": task "{identity.task}" is unknown')
        reports.append(evaluator(identity, meta, own, context))
    data = labelled.summary()
    data["evaluated_images"] = predictions.images
    data["skipped"] = dict(predictions.skipped)
    return EvaluationReport(reports, data, list(predictions.predictions))


def _identities(predictions: Iterable[Prediction]) -> list[ModelIdentity]:
    seen: dict[str, ModelIdentity] = {}
    for p in predictions:
        seen.setdefault(p.model.device_uid, p.model)
    return list(seen.values())


def _meta_from(identity: ModelIdentity) -> dict[str, Any]:
    return {"name": identity.name, "version": identity.version,
            "device_uid": identity.device_uid, "task": identity.task, "demo": identity.demo}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The command


class ProgressBar(Protocol):
    """The slice of :class:`tqdm.tqdm` used here (a context manager with ``update``)."""

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, n: int = 1) -> object: ...


ProgressFactory = Callable[[int | None, str], ProgressBar]


def analyse_labelled_set(
    bundles: Sequence[Path],
    labelled: LabelledSet,
    *,
    device: str = "auto",
    batch_size: int = 8,
    all_images: bool = False,
    progress: ProgressFactory | None = None,
    analyzer_factory: Callable[..., Analyzer] | None = None,
    on_result: Callable[[LabelledImage, ImageResult], None] | None = None,
) -> tuple[PredictionSet, dict[str, dict[str, Any]], list[ModelIdentity]]:
    """Load the bundles into the node's Analyzer and predict every labelled image; returns
    predictions, metadata by device UID and the model identities. Grad-CAM (each finding's
    own map) runs only with ``on_result`` (the localisation figures): it does not change the
    probabilities."""
    metas = [read_metadata(Path(b)) for b in bundles]
    for meta in metas:
        check_task_supported(meta)
    if analyzer_factory is None:
        from ai.inference import Analyzer as ModelAnalyzer

        check_device(device)
        analyzer_factory = ModelAnalyzer
    maps = on_result is not None
    analyzer = analyzer_factory(list(bundles), device=device, gradcam=maps, batch_size=batch_size,
                                **({"finding_maps": True} if maps else {}))
    summaries = {m.device_uid: bundle_summary(Path(b)) for m, b in zip(metas, bundles, strict=True)}
    bar = progress(len(labelled.images), "predict") if progress else None
    if bar is None:
        return predict(analyzer, labelled.images, batch_size=batch_size,
                       all_images=all_images, on_result=on_result), summaries, analyzer.models  # fmt: skip
    with bar:
        found = predict(analyzer, labelled.images, batch_size=batch_size,
                        all_images=all_images, progress=bar.update, on_result=on_result)  # fmt: skip
    return found, summaries, analyzer.models


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one (torch would assert deep inside)."""
    import torch

    from ai.inference import resolve_device

    if resolve_device(device).type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f'--device "{device}": CUDA is not available on this machine')


def run_evaluation(
    bundles: Sequence[Path],
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    boxes_json: Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    all_images: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    curves: bool = True,
    progress: ProgressFactory | None = None,
    locations_json: Path | None = None,
) -> tuple[EvaluationReport, dict[str, Any]]:
    """``training evaluate`` end to end; returns the report and the files written.

    With a locations sidecar (``locations_json``, else ``locations.json`` beside the labels
    CSV, as :mod:`training.synth` writes it) each classification model also gets its Grad-CAM
    localisation per label (:mod:`ai.reference.localisation`).
    """
    labelled = load_labelled_set_with_progress(data_dir, labels_csv, progress)
    boxes = _read_boxes(boxes_json) if boxes_json else None
    box_classes = _box_classes(boxes_json) if boxes_json else None
    sidecar = locations_json or locations_beside(labels_csv)
    localiser = Localiser(Path(data_dir), sidecar) if sidecar else None
    found, summaries, models = analyse_labelled_set(
        bundles, labelled, device=device, batch_size=batch_size, all_images=all_images,
        progress=progress, on_result=localiser.add if localiser else None,
    )  # fmt: skip
    report = evaluate_predictions(found, labelled, summaries, models=models, boxes=boxes,
                                  n_boot=n_boot, seed=seed, box_classes=box_classes)  # fmt: skip
    if localiser is not None:
        localiser.attach(report)
    files = write_evaluation(Path(out_dir), report, curves=curves)
    if curves:
        files["curves"].extend(plot_froc_curves(Path(out_dir), report))
    return report, files


class Localiser:
    """Grad-CAM localisation of the classification models against a locations sidecar."""

    def __init__(self, data_dir: Path, locations_json: Path) -> None:
        try:
            self.where = read_locations(Path(locations_json))
        except LocationsError as exc:
            raise EvaluateError(str(exc)) from exc
        self.data_dir = Path(data_dir).resolve()
        self.collector = LocalisationCollector()
        self.sidecar = Path(locations_json).name

    def add(self, image: LabelledImage, result: ImageResult) -> None:
        try:
            rel = Path(image.path).resolve().relative_to(self.data_dir).as_posix()
        except ValueError:
            return
        truth = {normalise_label(k): v for k, v in image.truth.items()}
        self.collector.add(result, self.where.get(normalise_path(rel)),
                           lambda label: truth.get(normalise_label(label)))

    def attach(self, report: EvaluationReport) -> None:
        """Each classification model's figures into its report (an empty dict: the set had
        no true positive with a region)."""
        for model in report.models:
            if model.identity.task == "classification":
                model.localisation = self.collector.figures(model.identity.device_uid)
        report.data["locations_file"] = self.sidecar


def _box_classes(boxes_json: Path) -> list[str] | None:
    """Class names of a YOLO map: ``classes.txt`` beside it (None: the bundle's labels)."""
    path = Path(boxes_json).parent / "classes.txt"
    if not path.is_file():
        return None
    return [n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()]


def load_labelled_set_with_progress(
    data_dir: Path, labels_csv: Path, progress: ProgressFactory | None
) -> LabelledSet:
    """:func:`load_labelled_set` with a bar over the files examined (total unknown)."""
    if progress is None:
        return load_labelled_set(data_dir, labels_csv)
    with progress(None, "index") as bar:
        return load_labelled_set(data_dir, labels_csv, progress=bar.update)


def _read_boxes(path: Path) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluateError(f'--boxes "{path}": not readable JSON ({exc})') from exc
    if not isinstance(doc, dict):
        raise EvaluateError(f'--boxes "{path}": expected an object of file -> box lines')
    return doc
