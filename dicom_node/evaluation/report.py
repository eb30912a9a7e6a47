"""Plain-text tables of evaluation runs (``dicom-node evaluate``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from ai.reference.metrics import Estimate
from dicom_node.evaluation.figures import LabelFigures
from dicom_node.evaluation.service import JobInfo
from dicom_node.evaluation.store import RunDetail
from dicom_node.store.states import RunState

COLUMNS = ("Label", "N+", "N-", "TP", "FP", "TN", "FN", "Sens [95% CI]", "Spec [95% CI]",
           "PPV", "NPV", "F1", "AUROC [95% CI]")


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _ci(est: Estimate) -> str:
    if math.isnan(est.value):
        return "-"
    return f"{est.value:.3f} [{_num(est.lower)}-{_num(est.upper)}]"


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return lines


def figures_rows(figures: Sequence[LabelFigures]) -> list[list[str]]:
    return [[f.label, str(f.n_pos), str(f.n_neg), str(f.tp), str(f.fp), str(f.tn), str(f.fn),
             _ci(f.sensitivity), _ci(f.specificity), _num(f.ppv.value), _num(f.npv.value),
             _num(f.f1), _ci(f.auroc)] for f in figures]


def _detection_line(f: LabelFigures) -> str:
    """Lesion-level figures of a detection label: AP50 and FROC sensitivities."""
    points = ", ".join(f"{fp:g}:{sens:.3f}" for fp, sens in (f.froc or []))
    return f"  {f.label}: AP50 {_num(f.ap50)}; FROC sensitivity at FP/image {points or '-'}"


def _localisation_line(f: LabelFigures) -> str:
    """Grad-CAM localisation of a classification label on its true positives."""
    loc = f.localisation or {}
    rate = (loc.get("hit_rate") or {}).get("value")
    return (f"  {f.label}: Grad-CAM pointing-game hit rate {_num(rate)} "
            f"({loc.get('hits', 0)}/{loc.get('tp_images', 0)} true positives), energy in the "
            f"lungs {_num(loc.get('lung_energy'))}")


def format_run(detail: RunDetail) -> str:
    """The per-label table of each model, then the exclusions and alerts."""
    run = detail.run
    lines = [f"evaluation job {run.job_name} ({run.kind}) run {run.id}: {run.state}, "
             f"trigger {run.trigger}, started {_when(run.started_at)}, "
             f"{run.n_images if run.n_images is not None else '-'} image(s) evaluated"]
    if run.error:
        lines.append(f"error: {run.error}")
    for model in run.models:
        thresholds = ", ".join(f"{k}={v:g}" for k, v in model.get("thresholds", {}).items())
        lines.append("")
        lines.append(f"model {model['name']} {model['version']} (device UID "
                     f"{model['device_uid']}){' DEMO' if model.get('demo') else ''}; "
                     f"thresholds: {thresholds or '-'}")
        figs = [f for f in detail.figures
                if (f.model_name, f.model_version) == (model["name"], model["version"])]
        lines += _table(figures_rows(figs), COLUMNS) if figs else ["(no labelled case)"]
        lines += [_detection_line(f) for f in figs if f.ap50 is not None]
        lines += [_localisation_line(f) for f in figs if f.localisation]
    summary = run.summary or {}
    if summary.get("excluded"):
        lines.append("")
        lines.append("not analysed (selection rules / unreadable):")
        lines += [f"  {n:5d}  {reason}" for reason, n in summary["excluded"].items()]
    if summary.get("withheld_out_of_distribution"):
        lines.append("")
        lines.append("withheld by a model's out-of-distribution gate (not in its figures):")
        lines += [f"  {n:5d}  {model}"
                  for model, n in summary["withheld_out_of_distribution"].items()]
    for key in ("images_without_labels", "labels_without_images", "note"):
        if summary.get(key):
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    if detail.alerts:
        lines.append("")
        lines += [f"ALERT: {a.model_name} {a.label} {a.metric} {_num(a.value)} below floor "
                  f"{a.floor:.3f}" for a in detail.alerts]
    return "\n".join(lines)


def format_jobs(jobs: Sequence[JobInfo]) -> str:
    rows = []
    for j in jobs:
        last = j.last_run
        rows.append([j.name, j.kind, "yes" if j.enabled else "no", j.schedule or "on demand",
                     f"{last.state} {_when(last.started_at)}" if last else "never",
                     str(last.alerts) if last else "-",
                     RunState.RUNNING.value if j.running_run_id else ""])
    if not rows:
        return "no evaluation jobs configured (evaluation.jobs in the config)"
    return "\n".join(_table(rows, ("Job", "Kind", "Enabled", "Schedule", "Last run", "Alerts",
                                   "")))
