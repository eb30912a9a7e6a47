"""The arithmetic every benchmark reports with: percentiles with their sample count, ratios,
verdicts against the issue's targets. Pure functions (no I/O), so the unit tests check them.

Why a sample count next to every percentile: a "p95" over 5 samples is the second-largest
value, not a tail; printing ``n`` keeps a quick run from passing for a full one.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from _common import percentile

__all__ = ["FULL_SAMPLES", "Verdict", "at_least", "at_most", "efficiency", "p95_label",
           "percentile", "queue_grew"]

FULL_SAMPLES = 30  # the floor for a p95


def p95_label(values: Sequence[float], unit: str = "s") -> str:
    """``"4.10 s (n=30)"``; a sample below :data:`FULL_SAMPLES` is marked ``quick``."""
    if not values:
        return "- (n=0)"
    mark = "" if len(values) >= FULL_SAMPLES else ", quick"
    return f"{percentile(values, 95):.2f} {unit} (n={len(values)}{mark})"


def efficiency(images: int, end_to_end_s: float, forward_s: float) -> float:
    """Pipeline efficiency: end-to-end images/s over raw-forward images/s.

    Both rates are for the same ``images``, so this is ``forward_s / end_to_end_s``; it is at
    most 1 when the pipeline includes the forward it is compared with.
    """
    if images <= 0 or end_to_end_s <= 0 or forward_s <= 0:
        raise ValueError(f"need positive images and times, got {images}, {end_to_end_s}, "
                         f"{forward_s}")
    return (images / end_to_end_s) / (images / forward_s)


def queue_grew(latencies: Sequence[float], interval_s: float) -> bool:
    """Whether latencies at a steady arrival rate climb: the last third's median exceeds the
    first third's by more than one arrival interval (a stable queue keeps them level).
    """
    if len(latencies) < 3:
        return False
    third = len(latencies) // 3
    first = statistics.median(latencies[:third])
    last = statistics.median(latencies[-third:])
    return last - first > interval_s


@dataclass(frozen=True)
class Verdict:
    """One summary row: what the issue asks, what was measured, and whether it holds."""

    name: str
    target: str
    measured: str
    ok: bool | None  # None: informational (no target)

    @property
    def status(self) -> str:
        return {True: "ok", False: "MISSED", None: "-"}[self.ok]


def at_most(name: str, value: float, limit: float, measured: str, unit: str = "") -> Verdict:
    return Verdict(name, f"<= {limit:g}{unit}", measured,
                   None if value != value else value <= limit)


def at_least(name: str, value: float, limit: float, measured: str, unit: str = "") -> Verdict:
    return Verdict(name, f">= {limit:g}{unit}", measured,
                   None if value != value else value >= limit)
