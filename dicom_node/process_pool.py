"""Child processes of one node, supervised: started, watched, restarted and stopped.

One owner for the rule, whatever the children do: analysis workers
(:mod:`dicom_node.worker_process`) and receivers sharing one port
(:mod:`dicom_node.receiver_process`) are both a :class:`ProcessPool`. Children are started
with multiprocessing *spawn* (a fresh interpreter, no forked locks, sockets or torch), by one
watcher thread: the kernel's parent-death signal follows the thread that forked, so that
thread must live as long as the pool. A child that dies is restarted after a doubling
backoff (reset once it ran for a minute); one that exits with a code its pool names as fatal
(it would only die again: models that cannot load, a port that cannot be bound) is not. On
stop every child gets SIGTERM, then SIGKILL after a bound.

A child reports to the parent over a pipe of its own (``(kind, value)`` tuples, see
:func:`send_report`); its exit and its reports wake the watcher at once. A child dies with
its parent (:func:`die_with_parent`), so a node killed with kill -9 leaves no orphan holding
leases or a listening socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from dicom_node.backoff import backoff_delay

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a child that ran this long starts the backoff afresh when it dies


@dataclass
class Slot:
    """One child's place in the pool: the process now in it and its restart state."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None  # the parent's end: the child's reports
    started_at: float = 0.0  # monotonic
    deaths: int = 0  # in a row, for the restart backoff
    restart_at: float | None = None  # monotonic; None: running or not to be restarted


class ProcessPool:
    """Supervises ``count`` children of one kind. Subclasses say what a child runs
    (:meth:`_process`), what its reports mean (:meth:`_on_report`) and what its death
    leaves to clean up (:meth:`_on_exit`)."""

    kind = "child"  # the children's name in logs and process names
    fatal_exit_codes: dict[int, str] = {}  # exit status -> why it is not restarted

    def __init__(self, count: int, *, restart_backoff_s: float) -> None:
        self.slots = [Slot(n) for n in range(count)]
        self.restart_backoff_s = restart_backoff_s
        self.restarts = 0
        self._rng = random.Random()
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- what subclasses define ---------------------------------------------------------------

    def _process(self, slot: Slot, report: Connection) -> tuple[Callable[..., None],
                                                                 tuple[Any, ...]]:
        """The child's main and its arguments (``report``: the child's end of the pipe)."""
        raise NotImplementedError

    def _spawn_environment(self) -> contextlib.AbstractContextManager[None]:
        """The environment a child inherits at its start (e.g. thread-pool bounds)."""
        return contextlib.nullcontext()

    def _on_report(self, slot: Slot, kind: str, value: object) -> None:
        """A ``(kind, value)`` report of the child in ``slot`` (watcher thread)."""

    def _on_exit(self, proc: BaseProcess) -> None:
        """A child is gone (died or stopped): release what it held."""

    def _start_detail(self) -> str:
        """Said in the log line of each start, after the pid."""
        return ""

    # -- the pool -----------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The pids of the children alive now."""
        return [s.process.pid for s in self.slots
                if s.process is not None and s.process.is_alive() and s.process.pid]

    def start(self) -> None:
        """Start the watcher, which starts the processes (see the module doc)."""
        with self._lock:
            if self._stopping.is_set() or self._thread is not None:
                return
            for slot in self.slots:
                slot.restart_at = 0.0
            self._thread = threading.Thread(target=self._watch, name=f"{self.kind}-pool",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every child, SIGKILL to those still alive after ``timeout``."""
        with self._lock:
            self._stopping.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        running = [s for s in self.slots if s.process is not None]
        for slot in running:
            if slot.process.is_alive():  # type: ignore[union-attr]
                slot.process.terminate()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        for slot in running:
            proc = slot.process
            assert proc is not None
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("%s process %d did not stop within %.0f s: killed",
                               self.kind, slot.index, timeout)
                proc.kill()
                proc.join(5.0)
            self._exited(proc)
            if slot.conn is not None:
                slot.conn.close()

    # -- the watcher thread -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the watcher must survive one bad round
                logger.exception("%s pool round failed", self.kind)
                self._stopping.wait(1.0)

    def _round(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)
        handles: list[object] = []
        for slot in self.slots:
            if slot.process is not None and slot.restart_at is None:
                handles.append(slot.process.sentinel)
                if slot.conn is not None:
                    handles.append(slot.conn)
        pending = [s.restart_at for s in self.slots if s.restart_at is not None]
        timeout = max(0.0, min(pending) - now) if pending else 1.0
        # a child's exit or report wakes the round; stop is seen within the 1 s bound
        wait(handles, timeout=min(timeout, 1.0))  # type: ignore[arg-type]
        for slot in self.slots:
            self._read_reports(slot)
            proc = slot.process
            if proc is not None and slot.restart_at is None and not proc.is_alive():
                self._died(slot, proc)

    def _start(self, slot: Slot) -> None:
        if self._stopping.is_set():
            slot.restart_at = None
            return
        receive, send = self._ctx.Pipe(duplex=False)
        target, args = self._process(slot, send)
        proc = self._ctx.Process(target=target, name=f"{self.kind}-{slot.index}", args=args,
                                 daemon=True)
        with self._spawn_environment():
            proc.start()
        send.close()  # the child holds its end: EOF here once it is gone
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn = proc, receive
        slot.started_at, slot.restart_at = time.monotonic(), None
        logger.info("%s process %d started (pid %d%s)", self.kind, slot.index, proc.pid,
                    self._start_detail())

    def _read_reports(self, slot: Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                kind, value = conn.recv()
                self._on_report(slot, kind, value)
        except (EOFError, OSError):
            conn.close()
            slot.conn = None

    def _died(self, slot: Slot, proc: BaseProcess) -> None:
        self._exited(proc)
        if self._stopping.is_set():
            return
        why = self.fatal_exit_codes.get(proc.exitcode or 0)
        if why is not None:
            logger.error("%s process %d %s: not restarted", self.kind, slot.index, why)
            slot.process = None
            return
        if time.monotonic() - slot.started_at >= STABLE_AFTER_S:
            slot.deaths = 0
        slot.deaths += 1
        delay = backoff_delay(slot.deaths, initial_s=self.restart_backoff_s,
                              max_s=RESTART_BACKOFF_MAX_S, jitter=0.0, rng=self._rng)
        logger.warning("%s process %d (pid %s) exited with code %s; restarting in %.1f s",
                       self.kind, slot.index, proc.pid, proc.exitcode, delay)
        self.restarts += 1
        slot.restart_at = time.monotonic() + delay

    def _exited(self, proc: BaseProcess) -> None:
        if proc.pid is not None and not proc.is_alive():
            self._on_exit(proc)


# -- in the child ---------------------------------------------------------------------------


def send_report(report: Connection | None, message: tuple[str, object]) -> None:
    """A report to the parent (best effort: a parent that is gone takes us with it)."""
    if report is not None:
        with contextlib.suppress(OSError):
            report.send(message)


def die_with_parent(parent_pid: int, stop: threading.Event) -> None:
    """Exit when the parent dies: SIGKILL from the kernel on Linux, and a poll of
    ``getppid`` (re-parented: the parent is gone) as the portable fallback."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the poll below is the guard
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)

    def poll() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                logger.warning("the node (pid %d) is gone: %s exits", parent_pid,
                               threading.main_thread().name)
                os._exit(0)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()
