"""Analysis workers as OS processes of their own, so that receiving never waits on inference.

Why: in one process the receiver, the assembler, the sender and the worker share one GIL,
and torch takes every core; with the worker busy, small-instance ingest dropped by a third.
A worker process has its own interpreter, and its torch threads are bounded
(``workers.torch_threads``, default cores - 1; OpenMP, BLAS and OpenCV pools too) so a core
stays with the receiver, and it runs niced (``workers.nice``): on contended cores the
receiver, which answers the PACS, goes first, while an idle CPU still serves inference.

The parent (the node) runs a :class:`WorkerPool`: it starts ``workers.count`` processes
(multiprocessing *spawn*: a fresh interpreter, no forked locks or sockets), restarts one that
dies after a doubling backoff (its jobs are re-queued at once: it is known dead, so no lease
has to expire), and on stop sends SIGTERM, then SIGKILL after a bound. A child runs
:func:`run_worker`: its own engine on the same database (SQLite in WAL mode with a busy
timeout lets the processes take turns writing; on PostgreSQL the claims skip locked rows),
the bundles loaded once, jobs claimed in batches from the lease-based
:class:`~dicom_node.jobs.JobQueue` with a heartbeat per job, outputs and deliveries written
exactly as a worker thread writes them. A child dies with its parent (``PR_SET_PDEATHSIG``,
and a ``getppid`` poll where that is missing), so a node killed with kill -9 leaves no
orphan holding leases: the restarted node re-queues the jobs its processes held.
:func:`run_worker` is meant to be the core of a worker *role* of its own later (issue 13).

Model readiness: each child reports the identities of the models it loaded over a pipe (or
why loading failed). The parent's ``node.analyzer`` is then a :class:`DeployedModels`: its
``models`` are the reported ones (the web page's model list; ``/readyz`` says "loaded" once
a worker process has loaded them), and its ``analyze`` loads the same bundles in the parent
on first use, which only evaluation jobs do, with torch held to one thread while it runs.
The demo bundles are built by the parent before any worker starts, once.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

import cv2
import pydicom

from ai.types import Analyzer, ImageResult, ModelIdentity
from dicom_node.analysis import load_analyzer
from dicom_node.backoff import backoff_delay
from dicom_node.config import Settings
from dicom_node.jobs import JobQueue
from dicom_node.logs import configure_logging
from dicom_node.spool import Spool
from dicom_node.store.db import make_engine
from dicom_node.worker import AnalysisWorker, output_settings

logger = logging.getLogger(__name__)

EXIT_MODEL_FAILED = 3  # a child that cannot load the bundles: not restarted (it would loop)
_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF_MAX_S = 60.0
_STABLE_AFTER_S = 60.0  # a child that ran this long starts the backoff afresh when it dies


def owner_prefix(node_id: str, pid: int) -> str:
    """Every lease a worker process takes starts with this (``requeue_owned_by``)."""
    return f"{node_id}:{pid}:"


class DeployedModels:
    """The parent's view of the models the worker processes loaded (see the module doc)."""

    def __init__(self, models: Sequence[ModelIdentity], load: Callable[[], Analyzer]) -> None:
        self._models = list(models)
        self._load = load
        self._loaded: Analyzer | None = None
        self._lock = threading.Lock()

    @property
    def models(self) -> list[ModelIdentity]:
        return list(self._models)

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        import torch  # the parent imports torch only if an evaluation job runs

        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            before = torch.get_num_threads()
            torch.set_num_threads(1)  # the receiver shares this process: one core at most
            try:
                return self._loaded.analyze(datasets)
            finally:
                torch.set_num_threads(before)


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None  # the parent's end: the child's readiness report
    started_at: float = 0.0  # monotonic
    deaths: int = 0  # in a row, for the restart backoff
    restart_at: float | None = None  # monotonic; None: running or not to be restarted


class WorkerPool:
    """Starts, watches, restarts and stops the worker processes of one node."""

    def __init__(self, settings: Settings, node_id: str, queue: JobQueue, *,
                 on_ready: Callable[[list[ModelIdentity]], None],
                 on_error: Callable[[str], None],
                 on_committed: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.queue = queue
        self.on_ready = on_ready
        self.on_error = on_error
        self.on_committed = on_committed  # a child committed outputs: wake the sender
        self.slots = [_Slot(n) for n in range(settings.workers.count)]
        self.restarts = 0
        self._rng = random.Random()
        self._ctx = multiprocessing.get_context("spawn")
        self._job_ready = self._ctx.Event()  # set by wake(): a job was queued
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """A job was queued: an idle child claims it now instead of at its next poll."""
        self._job_ready.set()

    def pids(self) -> list[int]:
        """The pids of the worker processes alive now."""
        return [s.process.pid for s in self.slots
                if s.process is not None and s.process.is_alive() and s.process.pid]

    def start(self) -> None:
        """Start the watcher, which starts the processes. It must be the one thread that
        starts them: the kernel's parent-death signal follows the thread that forked."""
        with self._lock:
            if self._stopping.is_set() or self._thread is not None:
                return
            for slot in self.slots:
                slot.restart_at = 0.0
            self._thread = threading.Thread(target=self._watch, name="worker-pool",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every child (each finishes its batch or is cut short), SIGKILL to
        those still alive after ``timeout``. Jobs they held are re-queued."""
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
                logger.warning("worker process %d did not stop within %.0f s: killed",
                               slot.index, timeout)
                proc.kill()
                proc.join(5.0)
            self._requeue(proc)
            if slot.conn is not None:
                slot.conn.close()

    # -- the watcher thread -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the watcher must survive one bad round
                logger.exception("worker pool round failed")
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
            self._read_report(slot)
            proc = slot.process
            if proc is not None and slot.restart_at is None and not proc.is_alive():
                self._died(slot, proc)

    def _start(self, slot: _Slot) -> None:
        if self._stopping.is_set():
            slot.restart_at = None
            return
        receive, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=run_worker, name=f"worker-{slot.index}",
                                 args=(self.settings, slot.index, self.node_id, os.getpid(),
                                       send, self._job_ready), daemon=True)
        with _thread_env(self.settings.workers.torch_thread_count):
            proc.start()
        send.close()  # the child holds its end: EOF here once it is gone
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn = proc, receive
        slot.started_at, slot.restart_at = time.monotonic(), None
        logger.info("worker process %d started (pid %d, %d torch thread(s), nice %d)",
                    slot.index, proc.pid, self.settings.workers.torch_thread_count,
                    self.settings.workers.nice)

    def _read_report(self, slot: _Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                kind, value = conn.recv()
                if kind == "ready":
                    self.on_ready(value)
                elif kind == "committed":
                    if self.on_committed is not None:
                        self.on_committed()
                else:
                    self.on_error(value)
        except (EOFError, OSError):
            conn.close()
            slot.conn = None

    def _died(self, slot: _Slot, proc: BaseProcess) -> None:
        self._requeue(proc)
        if self._stopping.is_set():
            return
        if proc.exitcode == EXIT_MODEL_FAILED:
            logger.error("worker process %d could not load the models: not restarted",
                         slot.index)
            slot.process = None
            return
        if time.monotonic() - slot.started_at >= _STABLE_AFTER_S:
            slot.deaths = 0
        slot.deaths += 1
        delay = backoff_delay(slot.deaths, initial_s=self.settings.workers.restart_backoff_s,
                              max_s=_RESTART_BACKOFF_MAX_S, jitter=0.0, rng=self._rng)
        logger.warning("worker process %d (pid %s) exited with code %s; restarting in "
                       "%.1f s", slot.index, proc.pid, proc.exitcode, delay)
        self.restarts += 1
        slot.restart_at = time.monotonic() + delay

    def _requeue(self, proc: BaseProcess) -> None:
        """The jobs a dead child held go back to the queue now (not after their lease)."""
        if proc.pid is not None and not proc.is_alive():
            self.queue.requeue_owned_by(owner_prefix(self.node_id, proc.pid))


# -- the child process ----------------------------------------------------------------------


def run_worker(settings: Settings, index: int, node_id: str, parent_pid: int | None,
               report: Connection | None = None, job_ready: EventType | None = None) -> None:
    """A worker process's main: load the bundles, then claim and analyse batches of jobs
    until SIGTERM (or until the parent is gone). Without ``parent_pid`` (a worker started
    on its own, as a role) nothing watches a parent."""
    threading.current_thread().name = f"worker-{index}"
    configure_logging(settings.logging.level)
    stop = threading.Event()
    if parent_pid is not None:
        _die_with_parent(parent_pid, stop)
    loading = True

    def _on_sigterm(_signum: int, _frame: object) -> None:
        if loading:  # no job claimed yet: nothing to finish, do not wait for the load
            os._exit(0)
        stop.set()

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us with SIGTERM
    _bound_torch_threads(settings.workers.torch_thread_count)
    os.nice(settings.workers.nice)  # contended cores go to the listener first
    try:
        analyzer = load_analyzer(settings)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which does not loop
        error = f"{type(exc).__name__}: {exc}"
        logger.error("model could not be loaded: %s", error)
        _send(report, ("error", error))
        raise SystemExit(EXIT_MODEL_FAILED) from None
    loading = False
    _send(report, ("ready", list(analyzer.models)))
    engine = make_engine(settings.database_url)
    try:
        worker = AnalysisWorker(engine, Spool(settings.storage.data_dir / "spool"),
                                JobQueue.from_settings(engine, settings.workers), analyzer,
                                output_settings(settings), settings.destinations)
        work(worker, f"{owner_prefix(node_id, os.getpid())}{index}", settings, stop,
             report=report, job_ready=job_ready)
    finally:
        engine.dispose()


def work(worker: AnalysisWorker, owner: str, settings: Settings, stop: threading.Event, *,
         report: Connection | None = None, job_ready: EventType | None = None) -> None:
    """Claim and analyse batches until ``stop``; idle rounds wait ``poll_interval_s`` or
    until the parent says a job was queued (``job_ready``). Committed outputs are reported
    to the parent, whose sender then delivers them at once."""
    w = settings.workers
    while not stop.is_set():
        if job_ready is not None:
            job_ready.clear()  # before claiming: a job queued from now on sets it again
        try:
            outcomes = worker.process_batch(owner, w.batch_jobs, w.batch_wait_s, stop)
        except Exception:  # noqa: BLE001 - the loop must survive one bad round
            logger.exception("worker round failed")
            outcomes = []
        if any(outcome.outputs for outcome in outcomes):
            _send(report, ("committed", sum(outcome.outputs for outcome in outcomes)))
        if outcomes:
            continue
        if job_ready is not None:
            job_ready.wait(w.poll_interval_s)
        else:
            stop.wait(w.poll_interval_s)


def _send(report: Connection | None, message: tuple[str, object]) -> None:
    if report is not None:
        with contextlib.suppress(OSError):  # the parent is gone: we are about to be too
            report.send(message)


_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_env(count: int) -> Iterator[None]:
    """The child's environment bounds its OpenMP/BLAS pools: they read it when numpy and
    torch are first imported, which in the child is before any of its code runs."""
    before = {name: os.environ.get(name) for name in _THREAD_ENV}
    os.environ.update({name: str(count) for name in _THREAD_ENV})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _bound_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    cv2.setNumThreads(count)  # OpenCV's own pool (resizing, blending)


def _die_with_parent(parent_pid: int, stop: threading.Event) -> None:
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
                logger.warning("the node (pid %d) is gone: worker exits", parent_pid)
                os._exit(0)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()
