"""Wiring of the running node: listener, assembler, workers, sender (and web, scheduler).

A process runs the roles it is given (:mod:`dicom_node.roles`, default all of them): the
receiver's listener and assembler, the workers, the sender loop, the web server and the
scheduler's duties (the evaluation schedule, retention, audit forwarding; only while this
process holds the scheduler lock of :mod:`dicom_node.singleton`). Several processes, on one
host or many, share one database and one spool directory.

Start-up order puts the DICOM listener first: acknowledging images needs only the spool and
the database, so a PACS can send while the model loads (or the demo bundle is built).

The loops of the result path hand over through :mod:`dicom_node.wakeups`: a release wakes
the assembler (now and at the end of its grace), a new job a worker, committed outputs the
sender; their poll intervals are only the safety net. Between processes (roles apart) on
PostgreSQL the same hand-overs travel as notifications (:mod:`dicom_node.notify`); on SQLite
the poll intervals are the hand-over.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ai.types import Analyzer, ModelIdentity
from dicom_node import disk, node_events, notify
from dicom_node.analysis import ensure_demo_bundle, load_analyzer
from dicom_node.audit_forward import SyslogForwarder
from dicom_node.config import Settings
from dicom_node.disk import DiskUsageSource
from dicom_node.evaluation.service import EvaluationService
from dicom_node.jobs import JobQueue
from dicom_node.receiver_process import ReceiverPool, receiving
from dicom_node.retention import Retention
from dicom_node.roles import ALL, ROLES, claim_identity
from dicom_node.scheduler import EvaluationScheduler, start_evaluation_scheduler
from dicom_node.scp import StudyRelease, start_scp
from dicom_node.sender import Sender
from dicom_node.singleton import SchedulerLock
from dicom_node.store import db
from dicom_node.store.group_commit import GroupCommit
from dicom_node.studies import StudyAssembler
from dicom_node.wakeups import Wakeup, Wakeups
from dicom_node.warmup import warm_up
from dicom_node.worker import AnalysisWorker, output_settings
from dicom_node.worker_process import DeployedModels, WorkerPool

logger = logging.getLogger(__name__)

LOCK_CHECK_S = 2.0  # how often a scheduler checks that its PostgreSQL lock session lives
RECEIVERS_START_S = 60.0  # receiver processes must all listen within this (spawned: ~1-3 s)


class Node:
    """The running service. ``start()`` returns once the listener is up."""

    def __init__(self, settings: Settings,
                 analyzer_factory: Callable[[Settings], Analyzer] = load_analyzer, *,
                 roles: frozenset[str] = ALL) -> None:
        self.settings = settings
        self.analyzer_factory = analyzer_factory
        self.roles = roles
        data_dir = settings.storage.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        # the prefix of every lease this process takes, unique among live processes
        self.identity = claim_identity(data_dir, roles)
        self.node_id = self.identity.node_id
        self.engine: Engine = db.make_engine(settings.database_url)
        self.ingestor = receiving(settings, self.engine,
                                  disk_usage=lambda: self.disk_usage())  # the one below
        self.spool = self.ingestor.spool
        self.queue = JobQueue.from_settings(self.engine, settings.workers)
        self.wakeups = Wakeups()
        studies = settings.studies
        self.assembler = StudyAssembler(self.engine, self.spool, studies.selection,
                                        studies.quiet_period_s, max_wait_s=studies.max_wait_s,
                                        release_grace_s=studies.release_grace_s,
                                        on_job=self._job_created,
                                        writer=self._assembly_writer(),
                                        commit_timeout_s=self.ingestor.commit_timeout_s)
        self.sender = Sender(self.engine, self.spool, settings.destinations, settings.sender,
                             settings.dicom.ae_title,
                             sc_syntax=str(settings.outputs.sc_transfer_syntax),
                             owner=f"{self.node_id}:sender")
        self.analyzer: Analyzer | None = None
        self.model_error: str | None = None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.servers: list = []  # the DICOM listeners (plain, TLS)
        self.extras: list[Callable[[], None]] = []  # stop hooks (web, scheduler)
        self.web: Any = None  # dicom_node.web.server.WebServer while web.enabled
        # evaluation jobs (web API: node.evaluation); runs use the deployed analyzer
        self.evaluation = EvaluationService(
            self.engine, settings, deployed=lambda: self.analyzer,
            model_error=lambda: self.model_error, stop_event=self.stop_event)
        self.scheduler: EvaluationScheduler | None = None
        self.scheduler_lock: SchedulerLock | None = None
        self.exit_status = 0  # 1: stopped on its own (the scheduler lock was lost)
        self.listener: notify.Listener | None = None  # PostgreSQL notifications, roles apart
        # worker processes (workers.mode "process"): an injected analyzer_factory (tests'
        # fakes, which need not survive pickling) keeps the workers as threads
        self.workers: WorkerPool | None = None
        if ("worker" in roles and settings.workers.mode == "process"
                and analyzer_factory is load_analyzer):
            self.workers = WorkerPool(settings, self.node_id, self.queue,
                                      on_ready=self._models_ready, on_error=self._model_failed,
                                      on_committed=self._outputs_committed)
            self.extras.append(self.workers.stop)
        # receiver processes behind one port (dicom.receiver_processes > 1): the listener
        # runs in them, assembly stays here (their releases wake it over their pipes)
        self.receivers: ReceiverPool | None = None
        if "receiver" in roles and settings.dicom.receiver_processes > 1:
            self.receivers = ReceiverPool(settings,
                                          on_release=self.wakeups.assembler.set_after)
            self.extras.append(self.receivers.stop)
        # the spool filesystem's use (watermarks, retention, /readyz, /metrics); tests may
        # replace it
        self.disk_usage: DiskUsageSource = lambda: disk.measure(self.spool.root)

    def _assembly_writer(self) -> GroupCommit | None:
        """SQLite: the ingest's group commit, the one writer of this process, so assembly
        never waits for the file's write lock against the instance rows. PostgreSQL locks
        rows and queues waiters without sleeping: there the assembly keeps a transaction of
        its own, so a batch never holds study rows of two kinds of work."""
        return self.ingestor.writer if db.is_sqlite(self.engine) else None

    @property
    def server(self):  # type: ignore[no-untyped-def]
        """The plain DICOM listener (None before start)."""
        return self.servers[0] if self.servers else None

    @property
    def listening(self) -> bool:
        """The DICOM listener is up: in this process, or in a receiver process."""
        return bool(self.servers) or (self.receivers is not None
                                      and self.receivers.listening() > 0)

    @property
    def ready(self) -> bool:
        return self.listening and self.analyzer is not None

    def start(self) -> None:
        roles = self.roles
        logger.info("process %s (pid %d): roles %s", self.node_id, os.getpid(),
                    ", ".join(r for r in ROLES if r in roles))
        node_events.record_started(self.engine, self.settings, self.node_id)
        if "worker" in roles:  # this slot's previous holder is dead: its jobs are ours
            self.queue.requeue_owned_by(f"{self.node_id}:")
        if "sender" in roles:
            self.sender.recover()
        if "receiver" in roles:
            # alone on the spool (all roles) every partial write is a crash's; with roles
            # apart, only those older than any association or result write can be
            self.spool.clean_tmp(0.0 if roles == ALL
                                 else self.settings.dicom.association_deadline_s)
            grace = self.settings.studies.release_grace_s
            release = None if grace is None else StudyRelease(grace, self.wakeups.assembler)
            if self.receivers is not None:
                self._start_receiver_processes(self.receivers)
            else:
                # N-EVENT-REPORTs on a new association arrive here and go to the ledger
                # (the database), whichever process sends
                self.servers = start_scp(self.settings.dicom, self.ingestor,
                                         commitment=self.sender.reports, release=release,
                                         receiver=f"{self.node_id}:{os.getpid()}")
            self._thread("assembler", self._assembler_loop)
        if "sender" in roles and self.settings.destinations:
            self._thread("sender", self._sender_loop)
        if "scheduler" in roles:
            self._start_scheduler_duties()
        if "worker" in roles:
            self._thread("model-loader", self._load_model_then_work)
        self._start_listener()
        self.extras.append(self.evaluation.close)
        if "web" in roles and (self.settings.web.enabled or roles != ALL):
            from dicom_node.web.server import start_web_server  # Flask only when enabled

            self.web = start_web_server(self)
            self.extras.insert(0, self.web.stop)  # stop serving before what it reads stops

    def _start_receiver_processes(self, pool: ReceiverPool) -> None:
        """Start the receiver processes and return once each listens; OSError (a port in
        use, a start that hangs) stops them and ends the node's start."""
        pool.start()
        try:
            pool.wait_listening(RECEIVERS_START_S)
        except OSError:
            pool.stop()
            raise
        logger.info("DICOM SCP %r: %d receiver processes listening on %s:%d (SO_REUSEPORT)",
                    self.settings.dicom.ae_title, len(pool.slots), self.settings.dicom.host,
                    self.settings.dicom.port)

    def _start_scheduler_duties(self) -> None:
        """The scheduled duties run only while this process holds the scheduler lock: at
        once when it is free, else from a thread that waits for the holder to go."""
        lock = self.scheduler_lock = SchedulerLock(self.engine)
        if lock.try_acquire():
            self._scheduled_duties()
            return

        def wait_then_run() -> None:
            if lock.acquire(self.stop_event):
                self._scheduled_duties()

        self._thread("scheduler-lock", wait_then_run)

    def _scheduled_duties(self) -> None:
        logger.info("scheduler lock taken (pid %d): evaluation schedule, retention and "
                    "audit forwarding run in this process", os.getpid())
        self._start_housekeeping()
        scheduler = start_evaluation_scheduler(self.evaluation, self.settings.evaluation)
        if scheduler is not None:
            self.scheduler = scheduler
            self.extras.append(scheduler.shutdown)
        lock = self.scheduler_lock
        if lock is not None and lock.path is None:  # PostgreSQL: the session may end
            self._thread("scheduler-lock-watch", lambda: self._watch_lock(lock))

    def _watch_lock(self, lock: SchedulerLock) -> None:
        """An advisory lock lives as long as its database session: when that ends (the
        server restarted, the connection was cut) another scheduler may take over, so this
        one stops at once (exit status 1: the service manager starts it again, waiting)."""
        while not self.stop_event.wait(LOCK_CHECK_S):
            if not lock.held():
                logger.error("scheduler lock lost (its database session ended): stopping "
                             "this process so that two schedulers never run at once")
                self.exit_status = 1
                self.stop_event.set()
                return

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _loop(self, interval: float, step: Callable[[], object],
              wake: Wakeup | None = None) -> None:
        """Run ``step`` until stopped; after an idle step sleep ``interval`` s, or until
        ``wake`` is set (``stop`` sets every wake-up)."""
        while not self.stop_event.is_set():
            try:
                busy = step()
            except Exception:  # noqa: BLE001 - a loop must survive one bad round
                logger.exception("background step failed")
                busy = False
            if busy:
                continue
            if wake is None:
                self.stop_event.wait(interval)
            else:
                wake.wait(interval)

    def _start_housekeeping(self) -> None:
        """Audit forwarding to syslog (optional); retention of the spool."""
        kept = self.settings.storage.retention
        if kept.enabled:
            retention = Retention(self.engine, self.spool, kept, self.settings.destinations,
                                  lambda: self.disk_usage(),
                                  thumbs_dir=data_path(self.settings, "thumbs"))
            self._thread("retention", lambda: self._loop(kept.interval_s, retention.run_once))
        syslog = self.settings.audit.syslog
        if syslog.enabled:
            forwarder = SyslogForwarder(self.engine, syslog)
            self._thread("audit-syslog", lambda: self._loop(syslog.poll_interval_s,
                                                            forwarder.run_once))
            self.extras.append(forwarder.close)

    def _assembler_loop(self) -> None:
        self._loop(self.settings.studies.poll_interval_s, self.assembler.run_once,
                   self.wakeups.assembler)

    def _sender_loop(self) -> None:
        self._loop(self.settings.sender.poll_interval_s, self.sender.run_once,
                   self.wakeups.sender)

    def _job_created(self) -> None:
        """The assembler queued a job: wake the worker threads or processes (those of
        other processes through the database)."""
        self._wake_workers()
        if self.roles != ALL and notify.supported(self.engine):
            notify.notify(self.engine, notify.JOBS)

    def _wake_workers(self) -> None:
        self.wakeups.worker.set()
        if self.workers is not None:
            self.workers.wake()

    def _outputs_committed(self) -> None:
        """A worker committed results: their deliveries are due now."""
        self.wakeups.sender.set()
        if self.roles != ALL and notify.supported(self.engine):
            notify.notify(self.engine, notify.DELIVERIES)

    def _start_listener(self) -> None:
        """PostgreSQL, roles apart: the hand-overs of other processes wake this one's
        loops (a worker's when a receiver queued a job, a sender's when a worker committed
        results)."""
        if self.roles == ALL or not notify.supported(self.engine):
            return
        handlers: dict[str, Callable[[], None]] = {}
        if "worker" in self.roles:
            handlers[notify.JOBS] = self._wake_workers
        if "sender" in self.roles:
            handlers[notify.DELIVERIES] = self.wakeups.sender.set
        if handlers:
            self.listener = notify.Listener(self.engine, handlers, self.stop_event)
            self._thread("notifications", self.listener.run)

    def _work_one(self, worker: AnalysisWorker, owner: str) -> object:
        """One batch of jobs; committed outputs wake the sender (their deliveries are due
        now)."""
        w = self.settings.workers
        outcomes = worker.process_batch(owner, w.batch_jobs, w.batch_wait_s, self.stop_event)
        if any(outcome.outputs for outcome in outcomes):
            self._outputs_committed()
        return outcomes

    def _load_model_then_work(self) -> None:
        if self.workers is not None:
            self._start_worker_processes(self.workers)
            return
        try:
            analyzer = self.analyzer_factory(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            self.model_error = f"{type(exc).__name__}: {exc}"
            logger.error("model could not be loaded: %s; images are still received and "
                         "queued", self.model_error)
            return
        if self.settings.workers.warm_up and self.analyzer_factory is load_analyzer:
            warm_up(analyzer, output_settings(self.settings))  # tests' fakes are not warmed
        names = ", ".join(m.display_name for m in analyzer.models)
        logger.info("models loaded: %s", names)
        worker = AnalysisWorker(self.engine, self.spool, self.queue, analyzer,
                                output_settings(self.settings), self.settings.destinations)
        self.analyzer = analyzer
        w = self.settings.workers
        for n in range(w.count):
            owner = f"{self.node_id}:{os.getpid()}:{n}"
            self._thread(f"worker-{n}", lambda o=owner: self._loop(
                w.poll_interval_s, lambda: self._work_one(worker, o), self.wakeups.worker))

    def _start_worker_processes(self, pool: WorkerPool) -> None:
        """Process mode: the demo bundles are built here once, then each worker process
        loads the bundles itself and reports their identities (``_models_ready``)."""
        try:
            ensure_demo_bundle(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log
            self._model_failed(f"{type(exc).__name__}: {exc}")
            return
        pool.start()

    def _models_ready(self, models: list[ModelIdentity]) -> None:
        if self.analyzer is None:
            logger.info("models loaded: %s", ", ".join(m.display_name for m in models))
            self.analyzer = DeployedModels(models, lambda: self.analyzer_factory(self.settings))

    def _model_failed(self, error: str) -> None:
        if self.analyzer is None and self.model_error is None:
            self.model_error = error
            logger.error("model could not be loaded: %s; images are still received and "
                         "queued", error)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wakeups.set_all()
        for hook in self.extras:
            hook()
        for server in self.servers:
            server.shutdown()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.sender.close()
        node_events.record_stopped(self.engine, self.node_id)
        if self.scheduler_lock is not None:
            self.scheduler_lock.release()
        self.engine.dispose()
        self.identity.release()


def run_forever(node: Node) -> None:
    import signal

    def _stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if node.stop_event.is_set():  # a second Ctrl-C / SIGTERM while stopping: once only
            logger.debug("%s again: already stopping", name)
            return
        logger.info("%s: stopping", name)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.start()
    while not node.stop_event.wait(1.0):
        pass
    node.stop()
    logger.info("stopped")


def data_path(settings: Settings, *parts: str) -> Path:
    return settings.storage.data_dir.joinpath(*parts)
