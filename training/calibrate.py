"""``training calibrate``: choose per-label operating thresholds and write them into a bundle.

Probabilities come from :class:`ai.inference.Analyzer` on a labelled validation set, the
same numbers the node will compare with the thresholds. Two rules:

- ``target_sensitivity``: the highest threshold whose sensitivity on the calibration set
  reaches the target, i.e. the best specificity at that sensitivity
  (:func:`ai.reference.metrics.threshold_for_sensitivity`);
- ``youden``: the threshold maximising J = sensitivity + specificity - 1
  (:func:`ai.reference.metrics.youden_threshold`).

Both place the cut half-way between two neighbouring scores, so every calibration case keeps
its call and no case sits exactly on the threshold.

**Versioning.** A new operating point changes what the device reports for the same image,
so a calibrated bundle is a new model version: the patch version is bumped (``1.2.3`` ->
``1.2.4``, or ``--version``) and the bundle gets a new device UID (IHE AI Results: the SR's
device observer must change when the model's behaviour changes). The UID is derived from
name, version, weights hash *and* thresholds, so two calibrations of the same weights never
share a UID. The record of the calibration (method, target, data summary, per-label
threshold before and after with the resulting sensitivity and specificity and their Wilson
intervals, previous version and device UID) goes into ``training.calibration`` of the
metadata; earlier records move to ``training.calibration_history``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from ai.bundle.load import load_bundle, save_bundle
from ai.bundle.metadata import BundleMetadata, read_metadata
from ai.codes import normalise_label
from ai.reference.metrics import binary_metrics_at, threshold_for_sensitivity, youden_threshold
from training.errors import TrainingError
from training.evaluate import (
    LabelledSet,
    ProgressFactory,
    analyse_labelled_set,
    load_labelled_set_with_progress,
)
from training.results import Prediction

logger = logging.getLogger(__name__)

METHODS = ("target_sensitivity", "youden")
_SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:[-+].*)?")


class CalibrationError(TrainingError, ValueError):
    """Thresholds cannot be chosen as asked (no positives, unknown label, bad version, ...)."""


@dataclass(frozen=True)
class LabelCalibration:
    """The outcome for one label: new threshold and what it gives on the calibration set."""

    label: str
    previous_threshold: float
    threshold: float | None  # None: skipped, see ``reason``
    n_pos: int
    n_neg: int
    sensitivity: dict[str, float | None] | None = None
    specificity: dict[str, float | None] | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if v is not None and v != ""}
        out["calibrated"] = self.threshold is not None
        return out


def bump_version(version: str) -> str:
    """``1.2.3`` -> ``1.2.4`` (a pre-release or build suffix is dropped)."""
    match = _SEMVER.fullmatch(version.strip())
    if not match:
        raise CalibrationError(
            f'version "{version}" is not MAJOR.MINOR.PATCH; give the new one with --version'
        )
    major, minor, patch = (int(g) for g in match.groups())
    return f"{major}.{minor}.{patch + 1}"


def choose_threshold(
    truth: np.ndarray, scores: np.ndarray, method: str, target: float | None = None
) -> float:
    """The operating threshold for one label by ``method`` (see the module docstring)."""
    if method == "target_sensitivity":
        if target is None:
            raise CalibrationError("target_sensitivity needs a target")
        return threshold_for_sensitivity(truth, scores, target)
    if method == "youden":
        return youden_threshold(truth, scores)
    raise CalibrationError(f'method "{method}" is not one of {list(METHODS)}')


def calibrate_label(
    label: str, previous: float, truth: np.ndarray, scores: np.ndarray, method: str,
    target: float | None,
) -> LabelCalibration:  # fmt: skip
    """Threshold and resulting figures for one label; skipped (with a reason) when the
    calibration set cannot support the method (no positives, or one class for Youden)."""
    n_pos, n_neg = int(np.sum(truth)), int(np.size(truth) - np.sum(truth))
    if n_pos == 0 or (method == "youden" and n_neg == 0):
        need = "positive cases" if n_pos == 0 else "negative cases"
        return LabelCalibration(label, previous, None, n_pos, n_neg,
                                reason=f"no {need} in the calibration set")  # fmt: skip
    threshold = min(1.0, max(0.0, choose_threshold(truth, scores, method, target)))
    m = binary_metrics_at(truth, scores, threshold)
    return LabelCalibration(label, previous, threshold, n_pos, n_neg,
                            m.sensitivity.as_dict(), m.specificity.as_dict())  # fmt: skip


def calibrate_predictions(
    metadata: BundleMetadata,
    predictions: Sequence[Prediction],
    *,
    method: str,
    target: float | None = None,
    labels: Sequence[str] | None = None,
) -> list[LabelCalibration]:
    """Per-label calibration of ``metadata``'s labels from this bundle's predictions."""
    names = {normalise_label(n): n for n in metadata.label_names}
    wanted = [normalise_label(n) for n in labels] if labels else list(names)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise CalibrationError(f"--labels-subset {unknown} not in the bundle's labels "
                               f"{metadata.label_names}")  # fmt: skip
    out = []
    for spec in metadata.labels:
        if normalise_label(spec.name) not in wanted:
            continue
        rows = [p for p in predictions if p.label == spec.name and p.truth is not None
                and p.model.device_uid == metadata.device_uid]  # fmt: skip
        truth = np.asarray([int(p.truth or 0) for p in rows], dtype=int)
        scores = np.asarray([p.probability for p in rows], dtype=float)
        out.append(calibrate_label(spec.name, spec.threshold, truth, scores, method, target))
    if not any(c.threshold is not None for c in out):
        reasons = "; ".join(f"{c.label}: {c.reason}" for c in out)
        raise CalibrationError(f"no label could be calibrated ({reasons})")
    return out


def calibrated_metadata(
    metadata: BundleMetadata,
    results: Sequence[LabelCalibration],
    *,
    method: str,
    target: float | None,
    data: dict[str, Any],
    version: str | None = None,
) -> BundleMetadata:
    """New metadata: thresholds replaced, version bumped, device UID cleared (re-derived on
    save), calibration record appended."""
    new = {r.label: r.threshold for r in results if r.threshold is not None}
    labels = tuple(replace(s, threshold=new.get(s.name, s.threshold)) for s in metadata.labels)
    new_version = version or bump_version(metadata.version)
    if new_version == metadata.version:
        raise CalibrationError(f'--version "{version}" must differ from the current version')
    record = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": method,
        **({"target_sensitivity": target} if method == "target_sensitivity" else {}),
        "previous_version": metadata.version,
        "previous_device_uid": metadata.device_uid,
        "data": data,
        "labels": {r.label: r.as_dict() for r in results},
    }
    training = dict(metadata.training)
    history = list(training.get("calibration_history", []))
    if "calibration" in training:
        history.append(training["calibration"])
    training["calibration"] = record
    if history:
        training["calibration_history"] = history
    return replace(metadata, labels=labels, version=new_version, training=training,
                   device_uid="", created="")  # fmt: skip


def operating_point_uid(metadata: BundleMetadata, weights_sha256: str) -> str:
    """Device UID from name, version, weights and thresholds (deterministic, unique per
    operating point)."""
    thresholds = json.dumps([[s.name, s.threshold] for s in metadata.labels])
    return generate_uid(entropy_srcs=[metadata.name, metadata.version, weights_sha256,
                                      thresholds])  # fmt: skip


def write_bundle(source: Path, target: Path, metadata: BundleMetadata) -> BundleMetadata:
    """Save ``metadata`` with ``source``'s weights into ``target`` (may equal ``source``):
    written to a sibling folder first, then swapped in, so a failure leaves the old bundle."""
    loaded = load_bundle(source, device="cpu")
    sha = hashlib.sha256((source / "models" / "model.pt").read_bytes()).hexdigest()
    metadata = replace(metadata, device_uid=operating_point_uid(metadata, sha))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        saved = save_bundle(staging, metadata, loaded.model, gate=loaded.gate)
        load_bundle(staging, device="cpu")  # must load exactly as the node will
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return saved


def replace_folder(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` (rename the old one away first)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{datetime.now(UTC):%Y%m%d%H%M%S%f}")
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class CalibrationOutcome:
    """What ``training calibrate`` did."""

    bundle: Path
    before: BundleMetadata
    after: BundleMetadata
    labels: list[LabelCalibration]
    data: dict[str, Any]


def run_calibration(
    bundle: Path,
    data_dir: Path,
    labels_csv: Path,
    *,
    method: str,
    target: float | None = None,
    labels_subset: Sequence[str] | None = None,
    out: Path | None = None,
    version: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    all_images: bool = False,
    progress: ProgressFactory | None = None,
    labelled: LabelledSet | None = None,
    force: bool = False,
) -> CalibrationOutcome:
    """``training calibrate`` end to end; writes into ``out`` (default: the bundle itself).

    An ``out`` folder other than the bundle that already exists is replaced only with
    ``force``.
    """
    if out is not None and Path(out).exists() and not _same(Path(out), Path(bundle)) and not force:
        raise CalibrationError(f'--out "{out}" exists; add --force to replace it')
    if method not in METHODS:
        raise CalibrationError(f'method "{method}" is not one of {list(METHODS)}')
    if method == "target_sensitivity" and (target is None or not 0.0 < target <= 1.0):
        raise CalibrationError(f"--target-sensitivity {target} must be in (0, 1]")
    before = read_metadata(bundle)
    if before.task != "classification":
        raise CalibrationError(f'Bundle "{before.name}": calibration of task "{before.task}" '
                               "is not supported (classification only)")  # fmt: skip
    labelled = labelled or load_labelled_set_with_progress(data_dir, labels_csv, progress)
    found, _, _ = analyse_labelled_set([bundle], labelled, device=device, batch_size=batch_size,
                                       all_images=all_images, progress=progress)  # fmt: skip
    if not found.results:
        raise CalibrationError("no image could be analysed: nothing to calibrate on")
    data = {**labelled.summary(), "evaluated_images": found.images, "skipped": found.skipped}
    results = calibrate_predictions(before, found.predictions, method=method, target=target,
                                    labels=labels_subset)  # fmt: skip
    for r in results:
        if r.threshold is None:
            logger.warning("label %s not calibrated: %s", r.label, r.reason)
    new_meta = calibrated_metadata(before, results, method=method, target=target, data=data,
                                   version=version)  # fmt: skip
    target_dir = Path(out) if out else Path(bundle)
    after = write_bundle(Path(bundle), target_dir, new_meta)
    logger.info("calibrated %s %s -> %s (%s)", before.name, before.version, after.version,
                after.device_uid)  # fmt: skip
    return CalibrationOutcome(target_dir, before, after, results, data)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def thresholds_of(metadata: BundleMetadata) -> dict[str, float]:
    """Label -> operating threshold."""
    return {s.name: s.threshold for s in metadata.labels}
