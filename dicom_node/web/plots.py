"""Evaluation plots as PNG (matplotlib's Agg canvas, no pyplot state, safe in threads):
sensitivity and specificity over time with 95% CI bands and floors, and ROC curves. Every
line belongs to one model (name and version) and one label: two models that share a label
name (a classifier's and a detector's "nodule") are never drawn as one series."""

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


def model_name(point: dict[str, Any]) -> str:
    """"name version" of the model a metrics row (or history point) belongs to."""
    return f"{point['model_name']} {point['model_version']}"


def _series(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Points grouped by model (name and version), in the order given: one line each, so
    no line ever joins the figures of two models."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        out.setdefault(model_name(p), []).append(p)
    return out


def _time_axis(ax: Any, times: list[datetime]) -> None:
    if min(times) == max(times):  # one instant: a day either side, not matplotlib's years
        ax.set_xlim(times[0] - timedelta(days=1), times[0] + timedelta(days=1))
    locator = AutoDateLocator(minticks=3, maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _metric_panel(ax: Any, metric: str, series: dict[str, list[dict[str, Any]]],
                  floor: float | None) -> bool:
    """One metric of every model as its own line with its 95% CI band; False if empty."""
    times: list[datetime] = []
    for i, (name, pts) in enumerate(series.items()):
        defined = [p for p in pts if p.get(metric) and p[metric]["value"] is not None]
        if not defined:
            continue
        colour = COLOURS[i % len(COLOURS)]
        x = [_time(p["started_at"]) for p in defined]
        figs = [p[metric] for p in defined]
        lo = [f["ci_lower"] if f["ci_lower"] is not None else f["value"] for f in figs]
        hi = [f["ci_upper"] if f["ci_upper"] is not None else f["value"] for f in figs]
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        ax.plot(x, [f["value"] for f in figs], marker="o", color=colour, linewidth=1.5,
                markersize=4, label=name, gid="series")
        times.extend(x)
    if times:
        _time_axis(ax, times)
    else:
        ax.text(0.5, 0.5, "not defined in any succeeded run\n(no such cases, or no run)",
                ha="center", va="center", transform=ax.transAxes, color="#666", fontsize=8)
        ax.set_xticks([])
    if floor is not None:
        ax.axhline(floor, color="#444", linestyle="--", linewidth=1, label=f"floor {floor:.2f}",
                   gid="floor")
    return bool(times)


def history_figure(label: str, points: Sequence[dict[str, Any]],
                   floors: dict[str, float | None]) -> Figure:
    """Two panels (sensitivity, specificity) of one label across runs, one line (with its
    95% CI band) per model and version: a classifier's and a detector's "nodule" are two
    series, never one."""
    series = _series(points)
    fig = Figure(figsize=(7.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    models = {p["model_name"] for p in points}
    fig.suptitle(f"{next(iter(models))} / {label}" if len(models) == 1 else label,
                 fontsize=10)
    for ax, metric in zip(axes, ("sensitivity", "specificity"), strict=True):
        drawn = _metric_panel(ax, metric, series, floors.get(metric))
        ax.set_ylim(0, 1.02)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
        if drawn or floors.get(metric) is not None:
            ax.legend(fontsize=7, loc="lower left", title="bands: 95% CI", title_fontsize=7)
    return fig


def history_png(label: str, points: Sequence[dict[str, Any]],
                floors: dict[str, float | None]) -> bytes:
    return _png(history_figure(label, points, floors))


def roc_figure(metrics: Sequence[dict[str, Any]]) -> Figure:
    """ROC curve of every model and label of one run, with its AUROC and operating point;
    the legend names the model ("cxr-demo-classifier 1.0.0 / nodule (AUROC 0.91)")."""
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1, gid="chance")
    drawn = 0
    for m in metrics:
        roc = m.get("roc") or []
        if len(roc) < 2:
            continue
        colour = COLOURS[drawn % len(COLOURS)]
        auroc = (m.get("auroc") or {}).get("value")
        name = f"{model_name(m)} / {m['label']}" + (
            f" (AUROC {auroc:.2f})" if auroc is not None else "")
        ax.plot([p[0] for p in roc], [p[1] for p in roc], color=colour, linewidth=1.5,
                label=name, gid="roc")
        sens, spec = m["sensitivity"]["value"], m["specificity"]["value"]
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], marker="o", color=colour, markersize=5,
                    gid="operating-point")
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
        ax.legend(fontsize=6, loc="lower right")
    return fig


def roc_png(metrics: Sequence[dict[str, Any]]) -> bytes:
    return _png(roc_figure(metrics))
