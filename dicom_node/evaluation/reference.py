"""Reference-set evaluation: the deployed models on a labelled folder of DICOM.

Every file goes through the same steps as live traffic: the header is read, the node's
selection rules (:func:`ai.selection.rejection_reason`) decide whether it is
analysed, and the images of one study are handed to ``Analyzer.analyze`` together, as a
worker does with a job. What is not analysed is counted by reason, never silently dropped.

The label file is the classification CSV ``training`` reads (:mod:`ai.reference.labels`): keyed by
``sop_instance_uid``, ``path`` (relative to ``dicom_dir``) or ``study_instance_uid``, with
one 0/1 column per label or a single ``label`` column (multi-class). Study-keyed labels are
evaluated per study (positive if any image is, probability = the maximum).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.errors import InvalidDicomError

from ai.batches import analyse_isolating
from ai.codes import normalise_label
from ai.reference.dicom_files import looks_like_dicom
from ai.reference.labels import LabelError, normalise_path, read_classification_labels
from ai.reference.localisation import (
    ImageLocations,
    LocalisationCollector,
    LocationsError,
    locations_beside,
    read_locations,
)
from ai.selection import rejection_reason
from ai.types import Analyzer, ImageResult, PixelDataError
from dicom_node.config import SelectionSettings
from dicom_node.evaluation.errors import EvaluationError, EvaluationInterrupted
from dicom_node.evaluation.figures import Case, study_cases

logger = logging.getLogger(__name__)

KeyKind = Literal["sop", "path", "study"]


@dataclass(frozen=True)
class ReferenceLabels:
    """The label file as the evaluation uses it: per record key, 0/1 per (normalised) label.

    Parsing is :func:`ai.reference.labels.read_classification_labels`, shared with ``training``, so
    the node reads exactly the files training reads. Multi-class files become one-hot
    records (a class the model does not know, e.g. "No Finding", is negative for all).
    """

    key: KeyKind
    labels: tuple[str, ...]  # normalised label names (``normalise_label``)
    records: dict[str, dict[str, int]]

    def truth(self, key: str, label: str) -> int | None:
        """0/1 for ``label`` on the record ``key``; None if either is not in the file."""
        record = self.records.get(key)
        return None if record is None else record.get(normalise_label(label))


def read_reference_labels(csv_path: Path) -> ReferenceLabels:
    """Read the classification CSV; errors name the file, line, column and value."""
    try:
        parsed = read_classification_labels(csv_path)
    except LabelError as exc:
        raise EvaluationError(f"reference labels_csv: {exc}") from exc
    names = tuple(normalise_label(n) for n in parsed.label_names)
    records = {key: dict(zip(names, rec.targets, strict=True))
               for key, rec in parsed.records.items()}
    return ReferenceLabels(key=parsed.key, labels=names, records=records)  # type: ignore[arg-type]


@dataclass
class ScanResult:
    """Which files are analysed (grouped by study) and why the others are not."""

    to_analyse: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)  # study -> [(path, record key)]
    excluded: Counter[str] = field(default_factory=Counter)
    files: int = 0
    non_dicom_files: int = 0
    images_without_labels: int = 0
    matched_keys: set[str] = field(default_factory=set)


def scan_reference(dicom_dir: Path, labels: ReferenceLabels, rules: SelectionSettings,
                   stop: threading.Event | None = None) -> ScanResult:
    """Read every header under ``dicom_dir``, apply the selection rules, match labels."""
    if not Path(dicom_dir).is_dir():
        raise EvaluationError(f"reference dicom_dir {str(dicom_dir)!r} is not a directory")
    scan = ScanResult()
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path in sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file()):
        if stop is not None and stop.is_set():
            raise EvaluationInterrupted("interrupted: the node is stopping")
        if not looks_like_dicom(path):
            scan.non_dicom_files += 1
            continue
        scan.files += 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            scan.excluded[f"header unreadable ({type(exc).__name__})"] += 1
            continue
        study = str(ds.get("StudyInstanceUID", ""))
        key = {"sop": str(ds.get("SOPInstanceUID", "")), "study": study,
               "path": normalise_path(path.relative_to(dicom_dir).as_posix())}[labels.key]
        labelled = key in labels.records
        if labelled:
            scan.matched_keys.add(key)
        reason = rejection_reason(ds, rules.to_rules())
        if reason is not None:
            scan.excluded[reason] += 1
        elif not labelled:
            scan.images_without_labels += 1
        else:
            groups[study].append((path, key))
    scan.to_analyse = dict(groups)
    return scan


def analyse_study(analyzer: Analyzer, datasets: Sequence[pydicom.Dataset]
                  ) -> tuple[list[ImageResult | None], list[str]]:
    """``analyze`` the study's images together, as a worker does; an image whose pixels
    cannot be used is isolated (None) with its reason, the others still count."""
    outcomes = analyse_isolating(analyzer, datasets)
    results = [None if isinstance(o, PixelDataError) else o for o in outcomes]
    return results, ["pixel data unusable" for r in results if r is None]


@dataclass
class ReferenceOutcome:
    cases: list[Case]  # classification findings only (detection: ``detection_figures``)
    results: list[ImageResult]
    summary: dict[str, Any]
    # the analysed images: (SOP Instance UID, path relative to dicom_dir, rows, columns),
    # as :func:`~dicom_node.evaluation.figures.reference_boxes` takes them
    images: list[tuple[str, str, int, int]] = field(default_factory=list)
    # Grad-CAM localisation per (model name, version, label), when the reference has a
    # locations.json beside its labels (ai.reference.localisation); empty otherwise
    localisation: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)


def evaluate_reference(dicom_dir: Path, labels_csv: Path, analyzer: Analyzer,
                       rules: SelectionSettings, stop: threading.Event | None = None
                       ) -> ReferenceOutcome:
    """Run ``analyzer`` over the reference set and pair every finding with its truth."""
    labels = read_reference_labels(labels_csv)
    locations = _read_locations(labels_csv)
    collector = LocalisationCollector()
    scan = scan_reference(dicom_dir, labels, rules, stop)
    image_cases: list[tuple[str, Case]] = []
    results: list[ImageResult] = []
    images: list[tuple[str, str, int, int]] = []
    # images a model's gate withheld: no findings, so no case for that model (they would
    # otherwise count as negatives); counted so the figures say what they leave out
    withheld: Counter[str] = Counter()
    for study, items in scan.to_analyse.items():
        if stop is not None and stop.is_set():
            raise EvaluationInterrupted("interrupted: the node is stopping")
        datasets = []
        for path, _ in items:
            try:
                datasets.append(pydicom.dcmread(path))
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                raise EvaluationError(f"reference image of study {study} became unreadable: "
                                      f"{type(exc).__name__}") from exc
        analysed, reasons = analyse_study(analyzer, datasets)
        scan.excluded.update(reasons)
        for (path, key), result in zip(items, analysed, strict=True):
            if result is None:
                continue
            results.append(result)
            withheld.update(v.model.display_name for v in result.withheld)
            images.append((result.sop_instance_uid, path.relative_to(dicom_dir).as_posix(),
                           int(result.rows), int(result.columns)))
            image_cases.extend((study, case) for case in _cases(result, key, labels))
            if locations is not None:
                rel = normalise_path(path.relative_to(dicom_dir).as_posix())
                collector.add(result, locations.get(rel),
                              lambda label, key=key: labels.truth(key, label))
    if not results:
        raise EvaluationError(
            f"reference set has no analysable labelled image ({scan.files} DICOM file(s); "
            f"excluded: {dict(scan.excluded) or 'none'}; without labels: "
            f"{scan.images_without_labels})")
    cases = (study_cases(image_cases) if labels.key == "study"
             else [case for _, case in image_cases])
    model_labels = {f.label for r in results for f in r.findings}
    summary = {
        "unit": "study" if labels.key == "study" else "image",
        "files": scan.files, "non_dicom_files": scan.non_dicom_files,
        "analysed": len(results), "excluded": dict(sorted(scan.excluded.items())),
        "images_without_labels": scan.images_without_labels,
        "labels_without_images": len(labels.records) - len(scan.matched_keys),
        "labels_not_in_reference": sorted(label for label in model_labels
                                          if normalise_label(label) not in labels.labels),
        "cases": len(cases),
        "withheld_out_of_distribution": dict(sorted(withheld.items())),
    }
    logger.info("reference set: %d file(s), %d analysed, %d excluded, %d without labels",
                scan.files, len(results), sum(scan.excluded.values()),
                scan.images_without_labels)
    localisation = {}
    if locations is not None:
        for model in {f.model for r in results for f in r.findings}:
            for label, figures in collector.figures(model.device_uid).items():
                localisation[(model.name, model.version, label)] = figures
    return ReferenceOutcome(cases, results, summary, images, localisation)


def _read_locations(labels_csv: Path) -> dict[str, ImageLocations] | None:
    """The reference's ``locations.json`` (beside the labels), or None without one."""
    sidecar = locations_beside(labels_csv)
    if sidecar is None:
        return None
    try:
        return read_locations(sidecar)
    except LocationsError as exc:
        raise EvaluationError(f"reference {exc}") from exc


def _cases(result: ImageResult, key: str, labels: ReferenceLabels) -> list[Case]:
    out = []
    for f in result.findings:
        if f.model.task == "detection":  # boxes: scored against reference boxes instead
            continue
        truth = labels.truth(key, f.label)
        if truth is None:  # label not in the reference, or unknown for this image
            continue
        out.append(Case(f.model.name, f.model.version, f.label, result.sop_instance_uid,
                        int(truth), float(f.probability), bool(f.positive),
                        float(f.threshold)))
    return out
