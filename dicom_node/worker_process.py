"""Analysis workers as OS processes of their own, so that receiving never waits on inference.

Why: in one process the receiver, the assembler, the sender and the worker share one GIL,
and torch takes every core; with the worker busy, small-instance ingest dropped by a third.
A worker process has its own interpreter, and its torch threads are bounded
(``workers.torch_threads``, default cores - 1; OpenMP, BLAS and OpenCV pools too) so a core
stays with the receiver, and it runs niced (``workers.nice``): on contended cores the
receiver, which answers the PACS, goes first, while an idle CPU still serves inference.

The parent (the node) runs a :class:`WorkerPool`, a :class:`~dicom_node.process_pool.ProcessPool`
(the supervision every child process of the node shares): it starts ``workers.count``
processes (multiprocessing *spawn*: a fresh interpreter, no forked locks or sockets),
restarts one that dies after a doubling backoff (its jobs are re-queued at once: it is known
dead, so no lease has to expire), and on stop sends SIGTERM, then SIGKILL after a bound. A child runs
:func:`run_worker`: its own engine on the same database (SQLite in WAL mode with a busy
timeout lets the processes take turns writing; on PostgreSQL the claims skip locked rows),
the bundles loaded once, jobs claimed in batches from the lease-based
:class:`~dicom_node.jobs.JobQueue` with a heartbeat per job, outputs and deliveries written
exactly as a worker thread writes them. A child dies with its parent (``PR_SET_PDEATHSIG``,
and a ``getppid`` poll where that is missing), so a node killed with kill -9 leaves no
orphan holding leases: the restarted node re-queues the jobs its processes held.
:func:`run_worker` is meant to be the core of a worker *role* of its own later (issue 13).

Model readiness: each child reports the identities of the models it loaded over a pipe (or
why loading failed), after its warm-up (:mod:`dicom_node.warmup`, ``workers.warm_up``: one
synthetic image analysed, so the first study is not slower than the next). The parent's
``node.analyzer`` is then a :class:`DeployedModels`: its ``models`` are the reported ones
(the web page's model list; ``/readyz`` says "loaded" once a worker process has loaded
them), and its ``analyze`` loads the same bundles in the parent on first use, which only
evaluation jobs do, with torch held to one thread while it runs.
The demo bundles are built by the parent before any worker starts, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any

import cv2
import pydicom

from ai.types import Analyzer, ImageResult, ModelIdentity
from dicom_node.analysis import load_analyzer
from dicom_node.config import Settings
from dicom_node.jobs import JobQueue
from dicom_node.logs import configure_logging
from dicom_node.process_pool import ProcessPool, Slot, die_with_parent, send_report
from dicom_node.spool import Spool
from dicom_node.store.db import make_engine
from dicom_node.warmup import warm_up
from dicom_node.worker import AnalysisWorker, output_settings

logger = logging.getLogger(__name__)

EXIT_MODEL_FAILED = 3  # a child that cannot load the bundles: not restarted (it would loop)


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


class WorkerPool(ProcessPool):
    """The worker processes of one node (see the module doc)."""

    kind = "worker"
    fatal_exit_codes = {EXIT_MODEL_FAILED: "could not load the models"}

    def __init__(self, settings: Settings, node_id: str, queue: JobQueue, *,
                 on_ready: Callable[[list[ModelIdentity]], None],
                 on_error: Callable[[str], None],
                 on_committed: Callable[[], None] | None = None) -> None:
        super().__init__(settings.workers.count,
                         restart_backoff_s=settings.workers.restart_backoff_s)
        self.settings = settings
        self.node_id = node_id
        self.queue = queue
        self.on_ready = on_ready
        self.on_error = on_error
        self.on_committed = on_committed  # a child committed outputs: wake the sender
        self._job_ready = self._ctx.Event()  # set by wake(): a job was queued

    def wake(self) -> None:
        """A job was queued: an idle child claims it now instead of at its next poll."""
        self._job_ready.set()

    def _process(self, slot: Slot, report: Connection) -> tuple[Callable[..., None],
                                                                 tuple[Any, ...]]:
        return run_worker, (self.settings, slot.index, self.node_id, os.getpid(), report,
                            self._job_ready)

    def _spawn_environment(self) -> contextlib.AbstractContextManager[None]:
        return _thread_env(self.settings.workers.torch_thread_count)

    def _start_detail(self) -> str:
        return (f", {self.settings.workers.torch_thread_count} torch thread(s), "
                f"nice {self.settings.workers.nice}")

    def _on_report(self, slot: Slot, kind: str, value: object) -> None:
        if kind == "ready":
            self.on_ready(value)  # type: ignore[arg-type]
        elif kind == "committed":
            if self.on_committed is not None:
                self.on_committed()
        else:
            self.on_error(str(value))

    def _on_exit(self, proc: BaseProcess) -> None:
        """The jobs a dead child held go back to the queue now (not after their lease)."""
        assert proc.pid is not None
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
        die_with_parent(parent_pid, stop)
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
        send_report(report, ("error", error))
        raise SystemExit(EXIT_MODEL_FAILED) from None
    if settings.workers.warm_up:  # SIGTERM meanwhile exits at once: nothing claimed yet
        warm_up(analyzer, output_settings(settings))
    loading = False
    send_report(report, ("ready", list(analyzer.models)))
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
            send_report(report, ("committed", sum(outcome.outputs for outcome in outcomes)))
        if outcomes:
            continue
        if job_ready is not None:
            job_ready.wait(w.poll_interval_s)
        else:
            stop.wait(w.poll_interval_s)


_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# OpenJPEG's decoding threads (Pillow's and pylibjpeg's), read at each decode: one per core.
# They wait on condition variables rather than spinning as OpenMP's do, so at the worker's
# nice level they take only what the listener leaves (a reduced 3000 x 2500 JPEG 2000
# decode: 340 -> 235 ms on this 2-core machine)
_DECODE_THREAD_ENV = "OPJ_NUM_THREADS"


@contextlib.contextmanager
def _thread_env(count: int) -> Iterator[None]:
    """The child's environment bounds its OpenMP/BLAS pools: they read it when numpy and
    torch are first imported, which in the child is before any of its code runs."""
    before = {name: os.environ.get(name) for name in (*_THREAD_ENV, _DECODE_THREAD_ENV)}
    os.environ.update({name: str(count) for name in _THREAD_ENV})
    os.environ[_DECODE_THREAD_ENV] = str(os.cpu_count() or 1)
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
