"""Writers for evaluation reports: ``metrics.json``, ``report.md``, ``predictions.csv``, PNGs.

The Markdown table follows the layout diagnostic-accuracy papers and model cards use
(one row per finding, 95% intervals in brackets); detection reports use the per-class
table of the detection literature (Class, Images, Instances, P, R, mAP50, mAP50-95).
Curves are drawn with Matplotlib's object API on an Agg canvas: no pyplot, no global
backend switch, safe in threads and on machines without a display.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai.reference.evaluate import LabelMetrics
    from ai.reference.metrics import Curve, Estimate
    from training.results import EvaluationReport, ModelReport, Prediction

logger = logging.getLogger(__name__)

CLASSIFICATION_HEADERS = (
    "Label", "Images", "Positives", "Sens [95% CI]", "Spec [95% CI]", "PPV", "NPV", "F1",
    "AUROC [95% CI]", "AP",
)  # fmt: skip
CONFUSION_HEADERS = ("Label", "Threshold", "TP", "FP", "TN", "FN", "PPV [95% CI]", "NPV [95% CI]")
DETECTION_HEADERS = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
LOCALISATION_HEADERS = ("Label", "TP images", "Pointing-game hit rate [95% CI]",
                        "Grad-CAM energy in lungs")
PREDICTION_COLUMNS = (
    "sop_instance_uid", "model", "model_version", "device_uid", "label", "probability",
    "threshold", "positive", "truth",
)  # fmt: skip
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A file-name-safe form of a model or label name."""
    return _SLUG.sub("_", text).strip("._") or "unnamed"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and rename (no half-written reports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, document: Any) -> Path:
    """Pretty JSON with NaN written as null (JSON has no NaN)."""
    atomic_write_text(path, json.dumps(_no_nan(document), indent=2, sort_keys=False) + "\n")
    return path


def _no_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Number formatting


def fmt(value: float | None, digits: int = 3) -> str:
    """``0.833``, or an em dash when undefined (0/0, one class only)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_ci(estimate: Estimate, digits: int = 3) -> str:
    """``0.833 [0.552–0.953]``."""
    if math.isnan(estimate.value):
        return "—"
    if math.isnan(estimate.lower):
        return fmt(estimate.value, digits)
    return f"{estimate.value:.{digits}f} [{estimate.lower:.{digits}f}–{estimate.upper:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; text columns left, numbers right aligned."""
    rows = [list(map(str, r)) for r in rows]
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table for the console, columns padded to their widest cell."""
    cells = [list(map(str, headers)), *(list(map(str, r)) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


# --------------------------------------------------------------------------------------------
# Report sections


def classification_rows(labels: Sequence[LabelMetrics]) -> list[list[str]]:
    rows = []
    for m in labels:
        op = m.operating_point
        rows.append([
            m.label, str(m.n), str(m.n_pos), fmt_ci(op.sensitivity), fmt_ci(op.specificity),
            fmt(op.ppv.value), fmt(op.npv.value), fmt(op.f1.value), fmt_ci(m.auroc),
            fmt(m.average_precision.value),
        ])  # fmt: skip
    return rows


def confusion_rows(labels: Sequence[LabelMetrics]) -> list[list[str]]:
    rows = []
    for m in labels:
        cm, op = m.operating_point.confusion, m.operating_point
        rows.append([m.label, f"{m.threshold:.4g}", str(cm.tp), str(cm.fp), str(cm.tn),
                     str(cm.fn), fmt_ci(op.ppv), fmt_ci(op.npv)])  # fmt: skip
    return rows


def detection_rows(detection: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-class detection table from ``{"classes": [{"class": ..., ...}]}``."""
    keys = ("class", "images", "instances", "precision", "recall", "map50", "map50_95")
    rows = []
    for row in detection.get("classes", []):
        cells = [row.get(k) for k in keys]
        rows.append([str(cells[0]), str(cells[1]), str(cells[2]),
                     *(fmt(c) if isinstance(c, float) else str(c) for c in cells[3:])])  # fmt: skip
    return rows


def localisation_rows(localisation: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows of the Grad-CAM localisation table (true-positive images per label)."""
    rows = []
    for label, row in localisation.items():
        rate = row.get("hit_rate") or {}
        ci = (f"{fmt(rate.get('value'))} [{fmt(rate.get('lower'))}–{fmt(rate.get('upper'))}]"
              if rate else "—")
        rows.append([label, str(row.get("tp_images", 0)), ci, fmt(row.get("lung_energy"))])
    return rows


def _model_section(model: ModelReport) -> list[str]:
    ident = model.identity
    demo = " — DEMO, not for clinical use" if ident.demo else ""
    out = [f"## {ident.name} {ident.version}{demo}", "",
           f"Task: {ident.task}; device UID `{ident.device_uid}`; weights SHA-256 "
           f"`{str(model.metadata.get('weights_sha256', ''))[:16]}…`", ""]  # fmt: skip
    if model.detection is not None:
        out += [markdown_table(DETECTION_HEADERS, detection_rows(model.detection)), ""]
    if model.labels:
        out += [markdown_table(CLASSIFICATION_HEADERS, classification_rows(model.labels)), ""]
        out += ["Operating point (the bundle's thresholds, positive = probability >= "
                "threshold):", "",
                markdown_table(CONFUSION_HEADERS, confusion_rows(model.labels)), ""]  # fmt: skip
    if model.localisation is not None:
        out += ["Grad-CAM localisation on true positives (pointing game: the map's maximum "
                "within 15 px at 224 px of the finding's region; energy: the map's mass in "
                "the lungs):", "",
                markdown_table(LOCALISATION_HEADERS, localisation_rows(model.localisation)), ""]
    for label, reason in model.not_evaluated.items():
        out.append(f"- `{label}` not evaluated: {reason}")
    if model.not_evaluated:
        out.append("")
    return out


def markdown_report(report: EvaluationReport) -> str:
    """The human-readable report: data summary, one table per model, conventions."""
    data = report.data
    skipped = ", ".join(f"{v} {k}" for k, v in data.get("skipped", {}).items()) or "none"
    mism = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in data.get("mismatches", {}).items()
                     if v) or "none"  # fmt: skip
    lines = [
        "# Evaluation report", "",
        f"Created {report.created}. Labels file `{data.get('labels_file', '')}`: "
        f"{data.get('labelled_images', 0)} labelled images, {data.get('evaluated_images', 0)} "
        f"evaluated ({data.get('studies', 0)} studies, {data.get('patients', 0)} patients). "
        f"Skipped: {skipped}. Label mismatches: {mism}.", "",
    ]  # fmt: skip
    for model in report.models:
        lines += _model_section(model)
    lines += [
        "Sensitivity, specificity, PPV and NPV: Wilson 95% intervals; F1: bootstrap of the "
        "confusion matrix; AUROC: Mann-Whitney with a stratified bootstrap 95% interval; "
        "AP: average precision (step-wise area under the precision-recall curve). "
        "ROC and PR curves: `curves/`.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_predictions_csv(path: Path, predictions: Sequence[Prediction]) -> Path:
    """One row per (image, model, label); probabilities at full double precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(PREDICTION_COLUMNS)
        for p in predictions:
            writer.writerow([
                p.sop_instance_uid, p.model.name, p.model.version, p.model.device_uid, p.label,
                repr(p.probability), repr(p.threshold), int(p.positive),
                "" if p.truth is None else int(p.truth),
            ])  # fmt: skip
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Curves


def plot_curve(path: Path, curve: Curve, *, kind: str, title: str, summary: str,
               operating: tuple[float, float] | None = None, baseline: float | None = None) -> Path:  # fmt: skip
    """One ROC (``kind="roc"``) or PR (``kind="pr"``) curve as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
        ax.plot(curve.x, curve.y, linewidth=1.8)  # ties give the diagonal segments
        ax.set_xlabel("1 - specificity (false-positive rate)")
        ax.set_ylabel("Sensitivity (true-positive rate)")
    else:
        if baseline is not None:
            ax.axhline(baseline, linestyle=":", color="grey", linewidth=1)
        ax.step(curve.x, curve.y, where="pre", linewidth=1.8)  # the area AP sums
        ax.set_xlabel("Recall (sensitivity)")
        ax.set_ylabel("Precision (PPV)")
    if operating is not None:
        ax.plot([operating[0]], [operating[1]], "o", color="crimson", label="operating point")
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"{title}\n{summary}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_model_curves(out_dir: Path, model: ModelReport) -> list[Path]:
    """ROC and PR PNGs for every label of ``model`` that has both classes / positives."""
    folder = out_dir / "curves" / slug(f"{model.identity.name}-{model.identity.version}")
    written = []
    for m in model.labels:
        op = m.operating_point
        title = f"{model.identity.name} {model.identity.version}: {m.label}"
        if m.roc is not None:
            point = (1 - op.specificity.value, op.sensitivity.value)
            written.append(plot_curve(folder / f"roc_{slug(m.label)}.png", m.roc, kind="roc",
                                      title=title, summary=f"AUROC {fmt_ci(m.auroc)}",
                                      operating=point))  # fmt: skip
        if m.pr is not None:
            point = (op.sensitivity.value, op.ppv.value)
            ok = not any(math.isnan(v) for v in point)
            written.append(plot_curve(folder / f"pr_{slug(m.label)}.png", m.pr, kind="pr",
                                      title=title, summary=f"AP {fmt(m.average_precision.value)}",
                                      operating=point if ok else None,
                                      baseline=m.n_pos / m.n if m.n else None))  # fmt: skip
    return written


def write_evaluation(out_dir: Path, report: EvaluationReport, *, curves: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write every file of an evaluation report; returns {kind: path(s)}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {
        "metrics": write_json(out_dir / "metrics.json", report.as_dict()),
        "report": out_dir / "report.md",
        "predictions": write_predictions_csv(out_dir / "predictions.csv", report.predictions),
        "curves": [],
    }
    atomic_write_text(files["report"], markdown_report(report))
    if curves:
        for model in report.models:
            files["curves"].extend(plot_model_curves(out_dir, model))
    logger.info("wrote evaluation report to %s (%d curve(s))", out_dir, len(files["curves"]))
    return files


def plot_froc_curves(out_dir: Path, report: EvaluationReport) -> list[Path]:
    """One FROC PNG per class of each detection model (sensitivity vs FP per image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for model in report.models:
        for name, froc in ((model.detection or {}).get("froc") or {}).items():
            if not froc.get("curve"):
                continue
            fig = Figure(figsize=(4.5, 4.5), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            x, y = zip(*froc["curve"], strict=True)
            ax.step(x, y, where="post", linewidth=1.8)
            ax.plot(froc["fp_per_image"], froc["sensitivity"], "o", color="crimson", markersize=4)
            ax.set_xscale("symlog", linthresh=0.125)
            ax.set_xlim(0, 8.5)
            ax.set_ylim(-0.01, 1.01)
            ax.set_xlabel("False positives per image")
            ax.set_ylabel("Lesion sensitivity (IoU >= 0.5)")
            ident = model.identity
            cpm = froc.get("cpm")
            summary = f"mean sensitivity at 1/8..8 FP/image {cpm:.3f}" if cpm is not None else ""
            ax.set_title(f"{ident.name} {ident.version}: {name} (FROC)\n{summary}", fontsize=9)
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            path = out_dir / "curves" / slug(f"{ident.name}-{ident.version}") / f"froc_{slug(name)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
            written.append(path)
    return written
