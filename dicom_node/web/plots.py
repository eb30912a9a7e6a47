"""Evaluation plots as PNG (matplotlib's Agg canvas, no pyplot state, safe in threads):
sensitivity and specificity over time with 95% CI bands and floors, and ROC curves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

COLOURS = ("#1f6fb2", "#c0392b", "#27ae60", "#8e44ad", "#d68910", "#17a589")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def history_png(label: str, points: Sequence[dict[str, Any]],
                floors: dict[str, float | None]) -> bytes:
    """Two panels (sensitivity, specificity) of one label across runs."""
    fig = Figure(figsize=(7.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, colour in zip(axes, ("sensitivity", "specificity"), COLOURS, strict=False):
        series = [(p["started_at"], p[metric]) for p in points
                  if p.get(metric) and p[metric]["value"] is not None]
        if series:
            x = [_time(t) for t, _ in series]
            if len(x) == 1:  # one point: a day either side, not matplotlib's default years
                ax.set_xlim(x[0] - timedelta(days=1), x[0] + timedelta(days=1))
            y = [f["value"] for _, f in series]
            lo = [f["ci_lower"] if f["ci_lower"] is not None else f["value"] for _, f in series]
            hi = [f["ci_upper"] if f["ci_upper"] is not None else f["value"] for _, f in series]
            ax.fill_between(x, lo, hi, color=colour, alpha=0.18, linewidth=0, label="95% CI")
            ax.plot(x, y, marker="o", color=colour, linewidth=1.5, markersize=4,
                    label=metric)
        else:
            ax.text(0.5, 0.5, "not defined in any succeeded run\n(no such cases, or no run)",
                    ha="center", va="center", transform=ax.transAxes, color="#666",
                    fontsize=8)
            ax.set_xticks([])
        floor = floors.get(metric)
        if floor is not None:
            ax.axhline(floor, color="#444", linestyle="--", linewidth=1,
                       label=f"floor {floor:.2f}")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{label}: {metric}", fontsize=10)
        ax.grid(alpha=0.3)
        if series:
            locator = AutoDateLocator(minticks=3, maxticks=6)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=7)
        if series or floor is not None:
            ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def roc_png(metrics: Sequence[dict[str, Any]]) -> bytes:
    """ROC curve of every label of one run, with its AUROC and operating point."""
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    drawn = 0
    for i, m in enumerate(metrics):
        roc = m.get("roc") or []
        if len(roc) < 2:
            continue
        colour = COLOURS[i % len(COLOURS)]
        auroc = (m.get("auroc") or {}).get("value")
        name = m["label"] + (f" (AUROC {auroc:.2f})" if auroc is not None else "")
        ax.plot([p[0] for p in roc], [p[1] for p in roc], color=colour, linewidth=1.5,
                label=name)
        sens, spec = m["sensitivity"]["value"], m["specificity"]["value"]
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], marker="o", color=colour, markersize=5)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no ROC points stored", ha="center", va="center", color="#666")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (dots: operating thresholds)", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
