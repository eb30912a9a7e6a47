"""Clocks tests drive by hand: the database's clock and a claimer's monotonic time."""

from __future__ import annotations

import threading
import time

from dicom_node.clock import Clock


class ManualClock(Clock):
    """``now`` (the database's clock) and ``monotonic`` (the claimer's own time), moved only
    by :meth:`advance` (both: time passes) and :meth:`jump` (the database's clock only)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.t = now
        self.mono = 0.0
        super().__init__(source=lambda: self.t, monotonic=lambda: self.mono)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.mono += seconds

    def jump(self, seconds: float) -> None:
        self.t += seconds


class JumpingClock(Clock):
    """The host's real time plus an offset that :meth:`jump` moves at once (NTP stepping
    the clock, a VM resumed): the database's clock of a clock-jump test. Monotonic time
    stays the real one."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()
        super().__init__(source=self._now)

    def _now(self) -> float:
        with self._lock:
            return time.time() + self.offset

    def jump(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds
