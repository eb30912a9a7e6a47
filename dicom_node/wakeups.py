"""Wake-ups of the result path, so that no step waits for its next poll.

A study's last image is followed by a chain of hand-overs: the association's release (the
study will be ready after a short grace), the assembler creating a job, a worker committing
outputs and deliveries, the sender sending them. Each background loop of the node sleeps on
its :class:`Wakeup` with its poll interval as the timeout: the hand-over before it wakes it
at once (or at a deadline, the end of a release's grace), and the poll stays as the safety
net for what the process cannot see (a restart, other processes on the same database,
backoff timers).

In-process only: worker processes and other hosts poll the database (or, on PostgreSQL, hear
its notifications); a receiver process of the node's own (``dicom.receiver_processes``)
sends its releases over its pipe to the parent, which sets the assembler's wake-up.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass, field

# a deadline fires this much late, so the waiter's wall-clock check (time.time) is past it
DEADLINE_MARGIN_S = 0.005


class Wakeup:
    """One loop's wake-up: :meth:`set` now, :meth:`set_after` a delay; :meth:`wait` sleeps
    until either, or its timeout, whichever comes first."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._deadlines: list[float] = []  # heap of time.monotonic() values

    def set(self) -> None:
        self._event.set()

    def set_after(self, delay_s: float) -> None:
        """Wake the loop ``delay_s`` from now (and now too: it re-computes its sleep)."""
        with self._lock:
            heapq.heappush(self._deadlines, time.monotonic() + delay_s + DEADLINE_MARGIN_S)
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s or until woken; True when woken (now or a deadline)."""
        now = time.monotonic()
        with self._lock:
            if self._deadlines:
                timeout = min(timeout, self._deadlines[0] - now)
        woken = self._event.wait(max(0.0, timeout))
        self._event.clear()  # before the loop's next step: a set() during it is kept
        now = time.monotonic()
        with self._lock:
            while self._deadlines and self._deadlines[0] <= now:
                heapq.heappop(self._deadlines)
                woken = True
        return woken


@dataclass(frozen=True)
class Wakeups:
    """The node's wake-ups, one per loop of the result path."""

    assembler: Wakeup = field(default_factory=Wakeup)  # a release (now, and after its grace)
    worker: Wakeup = field(default_factory=Wakeup)  # a job was created
    sender: Wakeup = field(default_factory=Wakeup)  # a job committed outputs and deliveries

    def set_all(self) -> None:
        """Stopping: every loop sees the stop at once instead of after its poll interval."""
        for wakeup in (self.assembler, self.worker, self.sender):
            wakeup.set()
