"""``training export``: finalise a bundle so ``dicom-node`` can load it unchanged.

Input is a bundle folder, or a training run folder holding one (``bundle/``, ``best/``,
``final/`` or the run folder itself; else the single ``configs/metadata.json`` below it).
The exported bundle gets:

- name and version (``--name`` / ``--version``); a new name or version means a new device
  UID (IHE AI Results: a changed model is a new device), derived from name, version, weights
  and thresholds; unchanged identity keeps its UID;
- validation metrics: from ``--metrics`` (a ``training evaluate`` ``metrics.json``; only the
  entry computed with *these* weights and *these* thresholds is accepted) or already in the
  metadata;
- the run's configuration (``run_config.json`` as ``training fit`` writes it, or
  ``config.json`` / ``config.yaml``) when the metadata lacks one, and an ``export`` record
  (time, source, checks done);
- ``docs/README.md``: a short model card with the validation table.

It is written to a staging folder, loaded back with :func:`ai.bundle.load.load_bundle` and, with
``--check-dicom``, run through :class:`ai.inference.Analyzer` on one file, and only then moved
to ``--out``. An existing ``--out`` is replaced only with ``--force``. Metadata that lacks
validation metrics or a training record is refused unless ``--allow-incomplete``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ai.bundle.gate import OodGate
from ai.bundle.load import load_bundle, save_bundle
from ai.bundle.metadata import METADATA_PATH, BundleMetadata, read_metadata
from ai.types import ImageResult
from training.calibrate import operating_point_uid, replace_folder
from training.errors import TrainingError

logger = logging.getLogger(__name__)

RUN_BUNDLE_DIRS = ("bundle", "best", "final", ".")
RUN_CONFIG_FILES = ("run_config.json", "config.json", "config.yaml", "config.yml", "run.json")


class ExportError(TrainingError, ValueError):
    """The bundle cannot be exported as asked (incomplete, ambiguous run, would overwrite)."""


@dataclass
class ExportOutcome:
    """What ``training export`` wrote and checked."""

    out: Path
    metadata: BundleMetadata
    warnings: list[str] = field(default_factory=list)
    check: ImageResult | None = None


def find_run_bundle(run: Path) -> Path:
    """The bundle folder inside a training run folder."""
    run = Path(run)
    if not run.is_dir():
        raise ExportError(f'--run "{run}" is not a folder')
    for name in RUN_BUNDLE_DIRS:
        if (run / name / METADATA_PATH).is_file():
            return (run / name).resolve() if name == "." else run / name
    found = sorted(
        p.parent.parent for p in run.rglob("metadata.json") if p.parent.name == "configs"
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise ExportError(f'--run "{run}": no bundle (configs/metadata.json) inside')
    names = ", ".join(str(p.relative_to(run)) for p in found)
    raise ExportError(f'--run "{run}": several bundles ({names}); pick one with --bundle')


def _run_config(run: Path) -> dict[str, Any] | None:
    for name in RUN_CONFIG_FILES:
        path = run / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                doc = yaml.safe_load(text)
            else:
                doc = json.loads(text)
        except (ValueError, ImportError) as exc:
            raise ExportError(f"{path}: unreadable run configuration ({exc})") from exc
        if isinstance(doc, dict):
            return doc
    return None


def validation_from_report(metrics_json: Path, metadata: BundleMetadata) -> dict[str, Any]:
    """The validation record for ``metadata`` from a ``training evaluate`` ``metrics.json``.

    Only an entry with the same weights (SHA-256) and the same thresholds is accepted, so
    the figures describe the operating point being exported.
    """
    try:
        doc = json.loads(Path(metrics_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f'--metrics "{metrics_json}": not readable JSON ({exc})') from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ExportError(f'--metrics "{metrics_json}" is not a training evaluate metrics.json')
    wanted = {s.name: s.threshold for s in metadata.labels}
    for entry in doc["models"]:
        model = entry.get("model", {})
        got = {lab.get("name"): lab.get("threshold") for lab in model.get("labels", [])}
        if model.get("weights_sha256") == metadata.weights_sha256 and got == wanted:
            return {
                "source": "training evaluate",
                "report_created": doc.get("created", ""),
                "evaluated_model": {k: model.get(k) for k in ("name", "version", "device_uid")},
                "data": doc.get("data", {}),
                "conventions": doc.get("conventions", {}),
                "metrics": entry.get("metrics", {}),
                "not_evaluated": entry.get("not_evaluated", {}),
            }
    raise ExportError(
        f'--metrics "{metrics_json}" has no entry for these weights and thresholds '
        f"({metadata.name} {metadata.version}); evaluate the bundle being exported"
    )


def completeness(metadata: BundleMetadata) -> tuple[list[str], list[str]]:
    """(missing, warnings): what a deployable bundle lacks, and what is merely advisable."""
    missing, warnings = [], []
    if not metadata.validation_metrics:
        missing.append("validation metrics (run training evaluate, then pass --metrics)")
    if not metadata.training:
        missing.append("training record (data summary and configuration)")
    calibrated = "calibration" in metadata.training or "threshold" in str(
        metadata.validation_metrics.get("method", "")
    )  # training calibrate's record, or training fit's own calibration on its val split
    if not calibrated:
        warnings.append("thresholds were never calibrated (training calibrate)")
    if metadata.demo:
        warnings.append("bundle is marked demo: findings are labelled not for clinical use")
    return missing, warnings


def model_card(metadata: BundleMetadata) -> str:
    """``docs/README.md``: identity, labels with codes and thresholds, validation figures."""
    lines = [
        f"# {metadata.name} {metadata.version}", "",
        metadata.description or "", "",
        f"- Task: {metadata.task}; network: {metadata.network.name}; input "
        f"{metadata.input.size} px",
        f"- Device UID: `{metadata.device_uid}`",
        f"- Weights SHA-256: `{metadata.weights_sha256}`",
        *(["- **DEMO bundle: not for clinical use**"] if metadata.demo else []), "",
        "| Label | Code | Threshold | Sens | Spec | AUROC |", "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    figures = _figures_by_label(metadata.validation_metrics)
    for spec in metadata.labels:
        m = figures.get(spec.name, {})

        def value(key: str, m: dict[str, Any] = m) -> str:
            v = (m.get(key) or {}).get("value") if isinstance(m.get(key), dict) else None
            return "—" if v is None else f"{v:.3f}"

        code = f"{spec.code.scheme} {spec.code.value} {spec.code.meaning}"
        lines.append(f"| {spec.name} | {code} | {spec.threshold:.4g} | {value('sensitivity')} "
                     f"| {value('specificity')} | {value('auroc')} |")  # fmt: skip
    data = metadata.validation_metrics.get("data", {})
    if data:
        lines += ["", f"Validation set: {data.get('evaluated_images', '?')} images, "
                      f"{data.get('studies', '?')} studies, {data.get('patients', '?')} patients."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _figures_by_label(validation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Label -> figures from a ``training evaluate`` record (``metrics``) or from the record
    ``training fit`` writes (``per_label`` -> split; the held-out test split preferred)."""
    if isinstance(validation.get("metrics"), dict):
        return validation["metrics"]
    out = {}
    for label, entry in (validation.get("per_label") or {}).items():
        if isinstance(entry, dict):
            out[label] = entry.get("test") or entry.get("val") or {}
    return out


def _check_dicom(bundle: Path, dicom: Path) -> ImageResult:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ai.inference import Analyzer

    try:
        ds = pydicom.dcmread(dicom)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise ExportError(f'--check-dicom "{dicom}": not readable DICOM ({exc})') from exc
    (result,) = Analyzer([bundle], device="cpu").analyze([ds])
    return result


def export_bundle(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    description: str | None = None,
    metrics_json: Path | None = None,
    run_dir: Path | None = None,
    check_dicom: Path | None = None,
    force: bool = False,
    allow_incomplete: bool = False,
) -> ExportOutcome:
    """Finalise ``source`` into ``out`` (see the module docstring)."""
    source, out = Path(source), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise ExportError(f'--out "{out}" is the source bundle; export into a new folder')
    if out.exists() and not force:
        raise ExportError(f'--out "{out}" exists; add --force to replace it')
    loaded = load_bundle(source, device="cpu")  # validates metadata, weights and their hash
    meta = loaded.metadata
    new = replace(meta, name=name or meta.name, version=version or meta.version,
                  description=description if description is not None else meta.description)  # fmt: skip
    if metrics_json is not None:
        new = replace(new, validation_metrics=validation_from_report(metrics_json, meta))
    training = dict(new.training)
    if run_dir is not None and "config" not in training:
        config = _run_config(Path(run_dir))
        if config is not None:
            training["config"] = config
    new = replace(new, training=training)
    missing, warnings = completeness(new)
    if missing and not allow_incomplete:
        raise ExportError("bundle metadata incomplete: " + "; ".join(missing)
                          + " (or --allow-incomplete)")  # fmt: skip
    warnings += [f"incomplete: {m}" for m in missing]
    identity_changed = (new.name, new.version) != (meta.name, meta.version)
    if identity_changed or not meta.device_uid:
        new = replace(new, device_uid=operating_point_uid(new, meta.weights_sha256))
    training["export"] = {
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"name": meta.name, "version": meta.version, "device_uid": meta.device_uid},
        "warnings": warnings,
        "checked_on_dicom": check_dicom is not None,
    }
    new = replace(new, training=training, created="" if identity_changed else meta.created)
    return stage_bundle(loaded.model, new, out, warnings, check_dicom, gate=loaded.gate)


def stage_bundle(model: Any, meta: BundleMetadata, out: Path, warnings: list[str],
                 check_dicom: Path | None, *, gate: OodGate | None = None,
                 fit_gate: Any = None) -> ExportOutcome:  # fmt: skip
    """Save into a staging folder, load it back as the node does (and run it on
    ``check_dicom``), then move it to ``out``: a broken bundle never reaches ``out``.
    ``gate`` (the source's ood gate) is kept; ``fit_gate(staging)`` fits a new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        saved = save_bundle(staging, meta, model, gate=gate)
        if fit_gate is not None:
            fit_gate(staging)
            saved = read_metadata(staging)
        (staging / "docs").mkdir(exist_ok=True)
        (staging / "docs" / "README.md").write_text(model_card(saved), encoding="utf-8")
        load_bundle(staging, device="cpu")  # exactly what the node does at start-up
        check = _check_dicom(staging, check_dicom) if check_dicom is not None else None
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for warning in warnings:
        logger.info("export %s %s: %s", saved.name, saved.version, warning)
    return ExportOutcome(out, saved, warnings, check)


def run_export(
    out: Path, *, bundle: Path | None = None, run: Path | None = None, **options: Any
) -> ExportOutcome:
    """``training export`` end to end: ``bundle`` or ``run`` (exactly one)."""
    if (bundle is None) == (run is None):
        raise ExportError("give exactly one of --bundle and --run")
    source = Path(bundle) if bundle is not None else find_run_bundle(Path(run))  # type: ignore[arg-type]
    if not (source / METADATA_PATH).is_file():
        raise ExportError(f'--bundle "{source}" has no {METADATA_PATH}')
    return export_bundle(source, Path(out), run_dir=Path(run) if run else None, **options)


def read_exported(out: Path) -> BundleMetadata:
    """The exported metadata (for callers that print a summary)."""
    return read_metadata(out)
