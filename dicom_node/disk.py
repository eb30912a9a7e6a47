"""Disk use of the spool's filesystem: one measurement, used by retention, ``/readyz`` and
``/metrics`` (and by anything that refuses input above a watermark)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskUsage:
    total_bytes: int
    used_bytes: int
    free_bytes: int  # available to this process (what a write can still use)

    @property
    def used_ratio(self) -> float:
        """Used share of the filesystem, as ``df`` counts it: used / (used + available)."""
        room = self.used_bytes + self.free_bytes
        return self.used_bytes / room if room else 1.0

    @property
    def used_pct(self) -> float:
        return 100.0 * self.used_ratio


DiskUsageSource = Callable[[], DiskUsage]


def measure(path: Path) -> DiskUsage:
    usage = shutil.disk_usage(path)
    return DiskUsage(total_bytes=usage.total, used_bytes=usage.used, free_bytes=usage.free)
