"""The node's out-of-the-box demo classifier, trained on phantoms in a few minutes on a CPU.

Training images are rendered in memory with :mod:`training.phantoms` (fast), given the
intensity variety the DICOM path produces (linear windows, a sigmoid VOI LUT, the percentile
window) and passed through :func:`ai.pixels.preprocess_image`, the same letterbox the node
uses. Calibration and validation go through real DICOM files written by
:func:`training.synth.synthesize` (every variant: MONOCHROME1/2, JPEG family, RLE, VOI LUT
sequences, rescale) and :func:`ai.pixels.preprocess`, exactly the node's code path. The
DICOM set is split by patient: one half sets each label's threshold (Youden J), the other
half gives the reported sensitivity, specificity and AUROC, so the figures are not
measured on the data that chose the thresholds.

The bundle is marked ``demo: true``: its findings are labelled "DEMO, not for clinical use"
everywhere the node shows them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ai.bundle.architectures import default_gradcam_layer
from ai.bundle.load import save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import default_code
from ai.networks import build_network
from ai.pixels import Letterbox, PreprocessParams, preprocess, preprocess_image
from ai.reference.labels import normalise_path
from ai.reference.localisation import TOLERANCE_MODEL_PX, ImageLocations, read_locations
from ai.reference.metrics import auroc_estimate, binary_metrics_at, youden_threshold
from ai.types import CodedConcept
from training.localisation import localise
from training.ood import gate_on_phantoms
from training.phantoms import FINDINGS, render_phantom
from training.synth import synthesize

logger = logging.getLogger(__name__)

DEMO_NAME = "cxr-demo-classifier"
DEMO_VERSION = "1.0.0"
DEMO_NETWORK = NetworkSpec(
    "densenet", {"init_features": 16, "growth_rate": 8, "block_config": [2, 4, 6, 4]}
)
DEMO_INPUT = InputSpec(size=224, channels=1, clahe=False, percentile_window=(0.5, 99.5))
# The classifier's labels: every phantom finding but the nodule. At 224 px a 8-30 mm nodule
# is 4-17 px and the small DenseNet did not learn it in the build's budget (held-out
# sensitivity/specificity near chance, README); the demo detector finds nodules at 256 px
# and its image-level call (a box >= its threshold) is the node's nodule finding, validated
# at image level in its own stage (training.demo_detector.image_level_validation).
DEMO_LABELS: tuple[str, ...] = tuple(name for name in FINDINGS if name != "nodule")
_COLUMNS = [FINDINGS.index(name) for name in DEMO_LABELS]


@dataclass(frozen=True)
class DemoPlan:
    """How much work one build does (full: a usable demo; quick: for tests)."""

    train_images: int
    steps: int
    batch_size: int
    learning_rate: float
    val_studies: int
    val_size: tuple[int, int]
    render_side: tuple[int, int]  # long side of the in-memory phantoms, min..max
    prevalence: float = 0.35


FULL = DemoPlan(1000, 300, 32, 4e-3, 160, (560, 480), (320, 400))
QUICK = DemoPlan(64, 8, 8, 3e-3, 12, (320, 288), (256, 288))


# --------------------------------------------------------------------------------------------
# Training data, rendered in memory


def _display_like(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-window a phantom the way the node's VOI step would for one of synth's variants.

    The synth DICOM variants carry a percentile window (1-99.5 %), a sigmoid VOI LUT, or
    no VOI (the node's 0.5-99.5 % window); training sees all three, with jitter.
    """
    sample = image[::4, ::4]
    choice = rng.random()
    if choice < 0.45:
        lo, hi = np.percentile(sample, [rng.uniform(0.2, 1.5), rng.uniform(99.0, 99.9)])
        out = (image - lo) / max(hi - lo, 1e-6)
    elif choice < 0.75:
        lo, hi = np.percentile(sample, [0.5, 99.8])
        centre, width = (lo + hi) / 2, max(hi - lo, 1e-6) / 6
        out = 1.0 / (1.0 + np.exp(-(image - centre) / width))
    else:
        lo, hi = np.percentile(sample, [0.5, 99.5])
        out = (image - lo) / max(hi - lo, 1e-6)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _render_one(index: int, seed: int, plan: DemoPlan, params: PreprocessParams) -> tuple[np.ndarray, list[int]]:  # fmt: skip
    rng = np.random.default_rng([seed, index, 0xD3])
    long_side = int(rng.integers(plan.render_side[0], plan.render_side[1] + 1))
    short_side = int(long_side * rng.uniform(0.8, 1.0))
    rows, cols = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    phantom = render_phantom(
        int(rng.integers(2**62)), rows, cols,
        view="PA" if rng.random() < 0.7 else "AP", prevalence=plan.prevalence,
    )  # fmt: skip
    tensor, _ = preprocess_image(_display_like(phantom.image, rng), params)
    labels = phantom.labels()
    return tensor, [labels[k] for k in _COLUMNS]


def render_training_set(
    plan: DemoPlan, seed: int, params: PreprocessParams, progress: bool, label: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, size, size) uint8 images and (N, labels) float targets."""
    images = torch.empty((plan.train_images, 1, params.size, params.size), dtype=torch.uint8)
    targets = torch.empty((plan.train_images, len(DEMO_LABELS)), dtype=torch.float32)
    for i in tqdm(range(plan.train_images), desc=f"{label}render phantoms", disable=not progress):
        tensor, labels = _render_one(i, seed, plan, params)
        images[i] = torch.from_numpy(np.rint(tensor * 255.0).astype(np.uint8))
        targets[i] = torch.tensor(labels, dtype=torch.float32)
    return images, targets


# --------------------------------------------------------------------------------------------
# Training


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-step contrast (gamma) and noise jitter; the padding stays zero."""
    x = batch.float() / 255.0
    n = x.shape[0]
    gamma = torch.exp(torch.empty(n, 1, 1, 1).uniform_(-0.25, 0.25, generator=gen))
    x = x.clamp_min(1e-6) ** gamma * (batch > 0)
    sigma = torch.empty(n, 1, 1, 1).uniform_(0.0, 0.02, generator=gen)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp_(0.0, 1.0)


def _lr_at(step: int, plan: DemoPlan) -> float:
    warmup = max(1, plan.steps // 20)
    if step < warmup:
        return plan.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, plan.steps - warmup)
    return plan.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(
    images: torch.Tensor, targets: torch.Tensor, plan: DemoPlan, seed: int, progress: bool,
    label: str = "",
) -> tuple[nn.Module, dict[str, Any]]:
    """AdamW with warm-up and cosine decay on sigmoid BCE; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_network(DEMO_NETWORK.name, DEMO_NETWORK.args, num_classes=len(DEMO_LABELS)).module
    optimiser = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=1e-4)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(plan.steps), desc=f"{label}train", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (plan.batch_size,), generator=gen)
        x, y = _augment(images[idx], gen), targets[idx]
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, plan)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    seconds = time.perf_counter() - started
    record = {
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "optimizer": "AdamW",
        "learning_rate": plan.learning_rate,
        "schedule": "linear warm-up + cosine",
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(seconds, 1),
        "images_per_second": round(plan.steps * plan.batch_size / max(seconds, 1e-9), 1),
    }
    return model.eval(), record


# --------------------------------------------------------------------------------------------
# DICOM validation: synth files -> the node's preprocessing -> thresholds and metrics


@dataclass
class Scored:
    """Scores of the DICOM validation images with their truth and patient ids."""

    scores: np.ndarray  # (N, labels)
    truth: np.ndarray  # (N, labels) 0/1
    patients: list[str]
    # for the Grad-CAM localisation figures: the model inputs, their letterboxes and where
    # each image's findings and lungs are (synth's locations.json)
    inputs: torch.Tensor | None = None
    letterboxes: list[Letterbox] = field(default_factory=list)
    locations: list[ImageLocations | None] = field(default_factory=list)


def score_dicom(
    model: nn.Module, folder: Path, plan: DemoPlan, seed: int, params: PreprocessParams,
    progress: bool, label: str = "",
) -> Scored:  # fmt: skip
    """Write phantom DICOM with synth, read it back through ai.pixels, score it."""
    with tqdm(total=plan.val_studies, desc=f"{label}validation: write DICOM", disable=not progress) as bar:
        summary = synthesize(
            folder, plan.val_studies, seed, size=plan.val_size, progress=bar.update
        )
    with summary.labels_csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    tensors, letterboxes = [], []
    for row in tqdm(rows, desc=f"{label}validation: read DICOM", disable=not progress):
        tensor, letterbox = preprocess(pydicom.dcmread(folder / row["path"]), params)
        tensors.append(tensor)
        letterboxes.append(letterbox)
    batch = torch.from_numpy(np.stack(tensors))
    with torch.inference_mode():
        scores = torch.cat([torch.sigmoid(model(chunk)) for chunk in batch.split(32)])
    truth = np.asarray([[int(row[name]) for name in DEMO_LABELS] for row in rows])
    where = read_locations(summary.locations_json)
    return Scored(scores.numpy(), truth, [row["patient_id"] for row in rows], batch,
                  letterboxes, [where.get(normalise_path(row["path"])) for row in rows])


def _patient_halves(patients: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (calibration, test), split by patient so no patient is in both."""

    def key(pid: str) -> str:
        return hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()

    ordered = sorted(set(patients), key=key)
    calibration = set(ordered[::2])
    mask = np.asarray([p in calibration for p in patients])
    return mask, ~mask


def _label_metrics(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    m = binary_metrics_at(truth, scores, threshold)
    return {
        "n_positive": int(truth.sum()),
        "n_negative": int((1 - truth).sum()),
        "sensitivity": m.sensitivity.as_dict(),
        "specificity": m.specificity.as_dict(),
        "ppv": m.ppv.as_dict(),
        "npv": m.npv.as_dict(),
        "auroc": auroc_estimate(truth, scores, n_boot=1000).as_dict(),
    }


def calibrate(scored: Scored, seed: int) -> tuple[list[float], dict[str, Any]]:
    """Youden thresholds on the calibration half; metrics on the held-out half (the
    localisation figures are added by :func:`add_localisation`)."""
    cal, test = _patient_halves(scored.patients, seed)
    thresholds: list[float] = []
    per_label: dict[str, Any] = {}
    for k, name in enumerate(DEMO_LABELS):
        y_cal, s_cal = scored.truth[cal, k], scored.scores[cal, k]
        try:
            threshold = youden_threshold(y_cal, s_cal)
        except ValueError:  # a tiny (quick) set may lack positives or negatives
            threshold = 0.5
        threshold = float(min(max(threshold, 0.0), 1.0))
        thresholds.append(threshold)
        per_label[name] = {
            "threshold": threshold,
            "test": _label_metrics(scored.truth[test, k], scored.scores[test, k], threshold),
        }
    summary = {
        "method": "Youden J on a patient-level calibration half; figures on the other half",
        "calibration_images": int(cal.sum()),
        "test_images": int(test.sum()),
        "per_label": per_label,
    }
    return thresholds, summary


def add_localisation(model: nn.Module, scored: Scored, thresholds: Sequence[float], seed: int,
                     metrics: dict[str, Any]) -> None:
    """Grad-CAM pointing game and lung energy per label on the held-out half's true
    positives, into ``metrics["per_label"][label]["localisation"]`` (None: no such image)."""
    if scored.inputs is None:
        return
    _, test = _patient_halves(scored.patients, seed)
    wanted = (scored.truth == 1) & (scored.scores >= np.asarray(thresholds)[None, :])
    found = localise(model, default_gradcam_layer(DEMO_NETWORK.name), scored.inputs,
                     scored.letterboxes, scored.locations, DEMO_LABELS, wanted & test[:, None])
    for name, entry in metrics["per_label"].items():
        entry["localisation"] = found.get(name)
    metrics["localisation_method"] = (
        f"Grad-CAM ({default_gradcam_layer(DEMO_NETWORK.name)}) on held-out true positives: "
        f"pointing game against the phantom's finding box, {TOLERANCE_MODEL_PX:.0f} px "
        f"tolerance at {DEMO_INPUT.size} px; mean fraction of map energy in the lung mask")


# --------------------------------------------------------------------------------------------
# The bundle


def _code(label: str) -> CodedConcept:
    code = default_code(label)
    if code is None:
        raise ValueError(f'No default code for demo label "{label}"')
    return code


def build_demo_bundle(
    out_dir: Path, *, seed: int = 0, progress: bool = True, quick: bool = False,
    label: str = "",
) -> Path:
    """Train the demo classifier on phantoms and write it as a bundle at ``out_dir``
    (``label`` prefixes the progress bars, e.g. ``"[1/2] "``).

    Full mode takes about two to three minutes on two CPU cores; ``quick=True`` takes
    seconds and makes no promise about quality (for tests). Returns ``out_dir``.
    """
    plan = QUICK if quick else FULL
    params = DEMO_INPUT.preprocess_params()
    started = time.perf_counter()
    images, targets = render_training_set(plan, seed, params, progress, label)
    rendered = time.perf_counter()
    model, train_record = train_model(images, targets, plan, seed, progress, label)
    trained = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-demo-val-") as tmp:
        scored = score_dicom(model, Path(tmp), plan, seed + 1, params, progress, label)
    thresholds, metrics = calibrate(scored, seed)
    localised = time.perf_counter()
    add_localisation(model, scored, thresholds, seed, metrics)
    phases = {
        "render_seconds": round(rendered - started, 1),
        "validation_seconds": round(localised - trained, 1),
        "localisation_seconds": round(time.perf_counter() - localised, 1),
        "torch_threads": torch.get_num_threads(),
    }
    metadata = BundleMetadata(
        name=DEMO_NAME,
        version=DEMO_VERSION if not quick else f"{DEMO_VERSION}-quick",
        description="Demo chest X-ray classifier trained on procedural phantoms. "
        "DEMO, not for clinical use.",
        labels=tuple(
            LabelSpec(name, _code(name), t) for name, t in zip(DEMO_LABELS, thresholds, strict=True)
        ),
        network=DEMO_NETWORK,
        input=DEMO_INPUT,
        multi_label=True,
        demo=True,
        training={
            "data": "procedural phantoms (training.phantoms), rendered in memory",
            "train_images": plan.train_images,
            "prevalence": plan.prevalence,
            "seed": seed,
            "quick": quick,
            "plan": asdict(plan),
            **train_record,
            **phases,
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        validation_metrics={"dicom_phantoms": plan.val_studies, **metrics},
    )
    save_bundle(Path(out_dir), metadata, model)
    gate_on_phantoms(Path(out_dir), quick=quick, size=plan.val_size, seed=seed + 7)
    logger.info("Demo bundle written to %s in %.0f s", out_dir, time.perf_counter() - started)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# What a build reached, for the console


def _ci(figure: dict[str, Any] | None) -> str:
    """``0.92 (0.81-0.97)`` from ``{"value", "lower", "upper"}``; ``n/a`` when undefined."""
    if not figure or figure.get("value") is None:
        return "n/a"
    if figure.get("lower") is None or figure.get("upper") is None:
        return f"{figure['value']:.2f}"
    return f"{figure['value']:.2f} ({figure['lower']:.2f}-{figure['upper']:.2f})"


def classifier_figures(meta: BundleMetadata) -> list[str]:
    """Per label: threshold, sensitivity, specificity, AUROC on the held-out DICOM half."""
    from training.report import text_table

    v = meta.validation_metrics
    rows = []
    for label, entry in v.get("per_label", {}).items():
        test = entry.get("test", {})
        where = entry.get("localisation") or {}
        rows.append([label, f"{entry.get('threshold', float('nan')):.2f}",
                     f"{test.get('n_positive', 0)}/{test.get('n_negative', 0)}",
                     _ci(test.get("sensitivity")), _ci(test.get("specificity")),
                     _ci(test.get("auroc")),
                     f"{_ci(where.get('hit_rate'))} [{where.get('tp_images', 0)}]",
                     _num(where.get("lung_energy"))])
    head = (f"held-out DICOM phantoms: {v.get('test_images', '?')} images (thresholds: "
            f"Youden J on the other {v.get('calibration_images', '?')}); Grad-CAM on the "
            "true positives [n]: pointing-game hit rate, energy in the lungs")
    return [head, *text_table(("label", "threshold", "pos/neg", "sensitivity (95% CI)",
                               "specificity (95% CI)", "AUROC (95% CI)",
                               "hit rate (95% CI) [n]", "lung energy"), rows)]


def detector_figures(meta: BundleMetadata) -> list[str]:
    """Per class, validation and held-out test split: P, R at the threshold, AP50, AP50-95."""
    from training.report import text_table

    rows, notes = [], []
    for label, entry in meta.validation_metrics.get("per_label", {}).items():
        notes.append(f"{label}: threshold {entry.get('threshold', float('nan')):.2f} "
                     f"({entry.get('threshold_method', '?')})")
        for split in ("val", "test"):
            row = entry.get(split)
            if row:
                rows.append([label, split, str(row.get("images", "")),
                             str(row.get("instances", "")),
                             *(_num(row.get(k)) for k in ("precision", "recall", "map50",
                                                          "map50_95"))])
    image = meta.validation_metrics.get("image_level")
    if image:
        notes.append(f"image-level nodule finding on {image['images']} fresh DICOM phantoms "
                     f"({image['n_positive']}/{image['n_negative']} pos/neg; threshold "
                     f"{image.get('threshold', float('nan')):.2f}: Youden J on the other "
                     f"{image.get('calibration_images', '?')}): sensitivity "
                     f"{_ci(image['sensitivity'])}, specificity {_ci(image['specificity'])}, "
                     f"AUROC {_ci(image['auroc'])}")
    return [*notes, *text_table(("class", "split", "images", "instances", "P", "R", "AP50",
                                 "AP50-95"), rows)]


def _num(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "n/a"


# --------------------------------------------------------------------------------------------
# CLI hook: `training demo-bundles --out DIR [--quick]`

HELP = "train the demo classifier and nodule detector on phantoms; bundles under --out"


@dataclass(frozen=True)
class _Stage:
    name: str  # bundle folder name
    title: str
    plan: str
    build: Any  # (out_dir, *, seed, progress, quick, label) -> Path
    figures: Any  # (BundleMetadata) -> list[str]


def _stages(quick: bool) -> list[_Stage]:
    from training import demo_detector as det

    plan = QUICK if quick else FULL
    dplan = det.QUICK if quick else det.FULL
    return [
        _Stage(DEMO_NAME, f"demo classifier (DenseNet, {DEMO_INPUT.size} px, "
               f"{len(DEMO_LABELS)} labels)",
               f"{plan.train_images} rendered phantoms, {plan.steps} training steps of "
               f"{plan.batch_size}, validation on {plan.val_studies} DICOM phantom studies",
               build_demo_bundle, classifier_figures),
        _Stage(det.DETECTOR_NAME, f"demo nodule detector (RetinaNet, ResNet-10 + FPN, "
               f"{dplan['size']} px)",
               f"{dplan['count']} DICOM phantom studies, {dplan['epochs']} epoch(s)",
               det.build_demo_detector, detector_figures),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the demo bundles")
    parser.add_argument("--quick", action="store_true", help="seconds-long build for tests")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only on a terminal anyway)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo-bundles`` on an ``add_subparsers()`` object; sets ``func=run``."""
    parser = subparsers.add_parser("demo-bundles", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _say(text: str = "") -> None:
    print(text, flush=True)  # CLI output: stage lines and figures, also into a log file


def run(args: argparse.Namespace) -> int:
    """Build ``<out>/cxr-demo-classifier`` and ``<out>/cxr-demo-detector``, saying what is
    being built (stage N of M) and the validation figures each bundle reached.

    Progress bars go to stderr only when it is a terminal: written to a log file (the node
    runs this with its output in its log), each redraw would append to one long line.
    """
    from ai.bundle.metadata import read_metadata

    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    out = Path(args.out)
    quick = bool(args.quick)
    progress = not args.no_progress and sys.stderr.isatty()
    stages = _stages(quick)
    started = time.perf_counter()
    _say(f"Building the DEMO bundles (trained on phantoms, not for clinical use) into {out} "
         f"({'quick' if quick else 'full'} build, {len(stages)} stages)")
    for n, stage in enumerate(stages, 1):
        tag = f"[{n}/{len(stages)}]"
        _say(f"{tag} {stage.title}: {stage.plan}")
        t0 = time.perf_counter()
        target = stage.build(out / stage.name, seed=args.seed, progress=progress, quick=quick,
                             label=f"{tag} ")
        meta = read_metadata(target)
        _say(f"{tag} {meta.name} {meta.version} written to {target} in "
             f"{time.perf_counter() - t0:.0f} s; validation:")
        for line in stage.figures(meta):
            _say(f"      {line}")
    _say(f"DEMO bundles ready in {time.perf_counter() - started:.0f} s under {out}")
    return 0
