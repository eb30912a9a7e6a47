"""Several receiver processes behind one DICOM port (``dicom.receiver_processes``).

Why: one process receives with one GIL; pynetdicom's PDU reassembly and the C-STORE handler
of every association take turns on it, so many parallel associations queue behind each
other. With ``dicom.receiver_processes: N`` (N > 1) the node process (role all or receiver)
does not listen itself: it runs a :class:`ReceiverPool` of N children, each binding the
node's DICOM port(s) with SO_REUSEPORT (:mod:`dicom_node.transport`), so that Linux spreads
incoming connections over them. The pool is a :class:`~dicom_node.process_pool.ProcessPool`,
supervised like the worker processes: a child that dies (kill -9 included) is restarted after
a short doubling backoff while its siblings keep accepting on the port; one that cannot bind
is not restarted, and the node's start fails with its message.

What a child runs is the listener and ingest only (:func:`run_receiver`): its own engine on
the same database, the same spool, its own group commit; each C-STORE is answered once its
row and file are durable, exactly as in one process (ACK subset of DURABLE). It never
imports torch. It holds a receiver slot of its own (:func:`dicom_node.roles.claim_identity`,
label ``receiver``), and audits its associations under that owner id and its pid, so the
database says which process received what. Study assembly stays in the parent: a child's
association release is recorded in the database and reported over the pipe, and the
parent's assembler wakes for the end of its grace (:class:`ParentWakeup`).

A child's partial data sets (an association cut by its death) stay under the spool's
``tmp/`` until the node's next start, or until they are older than
``dicom.association_deadline_s`` (roles apart): the siblings may be writing the young ones.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy import Engine

from dicom_node import node_events
from dicom_node.config import Settings
from dicom_node.delivery.commitment import CommitmentReports
from dicom_node.delivery.ledger import Ledger
from dicom_node.disk import DiskUsageSource
from dicom_node.ingest import Ingestor
from dicom_node.logs import configure_logging
from dicom_node.process_pool import ProcessPool, Slot, die_with_parent, send_report
from dicom_node.roles import claim_identity
from dicom_node.scp import StudyRelease, start_scp
from dicom_node.spool import Spool, Watermarks
from dicom_node.store.db import make_engine

logger = logging.getLogger(__name__)

EXIT_LISTEN_FAILED = 4  # the port cannot be bound: restarting would fail the same way
RESTART_BACKOFF_S = 0.5  # a receiver starts in about a second, and the PACS is waiting
RECEIVER = frozenset({"receiver"})


def receiving(settings: Settings, engine: Engine,
              disk_usage: DiskUsageSource | None = None) -> Ingestor:
    """The spool and the ingestor a receiving process writes through (``ingestor.spool``)."""
    storage = settings.storage
    spool = Spool(settings.storage.data_dir / "spool", min_free_bytes=storage.min_free_bytes,
                  watermarks=Watermarks(storage.high_watermark_pct, storage.low_watermark_pct),
                  disk_usage=disk_usage)
    return Ingestor(engine, spool, max_instance_bytes=storage.max_instance_bytes,
                    max_inflated_bytes=storage.max_inflated_bytes)


class ReceiverPool(ProcessPool):
    """The receiver processes of one node, all listening on its DICOM port(s)."""

    kind = "receiver"
    fatal_exit_codes = {EXIT_LISTEN_FAILED: "could not listen"}

    def __init__(self, settings: Settings, *,
                 on_release: Callable[[float], None] | None = None) -> None:
        super().__init__(settings.dicom.receiver_processes,
                         restart_backoff_s=RESTART_BACKOFF_S)
        self.settings = settings
        self.on_release = on_release  # a child's association released studies: grace (s)
        self._listening: dict[int, int] = {}  # slot index -> pid of the child listening
        self._error: str | None = None
        self._changed = threading.Condition()

    def listening(self) -> int:
        """How many children listen now."""
        alive = set(self.pids())
        with self._changed:
            return sum(1 for pid in self._listening.values() if pid in alive)

    def wait_listening(self, timeout: float) -> None:
        """Block until every child listens; OSError with a child's reason when one cannot
        (a port in use) or when they do not within ``timeout`` s."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: self._error is not None or len(self._listening) == len(self.slots),
                timeout)
            if self._error is not None:
                raise OSError(self._error)
            if not done:
                raise OSError(f"{len(self.slots) - len(self._listening)} of {len(self.slots)} "
                              f"receiver processes not listening after {timeout:.0f} s")

    def _process(self, slot: Slot, report: Connection) -> tuple[Callable[..., None],
                                                                 tuple[Any, ...]]:
        return run_receiver, (self.settings, slot.index, os.getpid(), report)

    def _on_report(self, slot: Slot, kind: str, value: object) -> None:
        if kind == "release":
            if self.on_release is not None:
                self.on_release(float(value))  # type: ignore[arg-type]
            return
        with self._changed:
            if kind == "listening":
                self._listening[slot.index] = int(value)  # type: ignore[call-overload]
            else:
                self._error = str(value)
                logger.error("receiver process %d: %s", slot.index, value)
            self._changed.notify_all()


class ParentWakeup:
    """A child's stand-in for the parent's assembler wake-up: a release's grace goes over
    the pipe (from the association threads, hence the lock)."""

    def __init__(self, report: Connection | None) -> None:
        self._report = report
        self._lock = threading.Lock()

    def set_after(self, delay_s: float) -> None:
        with self._lock:
            send_report(self._report, ("release", delay_s))


def run_receiver(settings: Settings, index: int, parent_pid: int | None,
                 report: Connection | None = None) -> None:
    """A receiver process's main: listen on the shared port(s) until SIGTERM (or until the
    parent is gone), then stop the listener. Reports ``listening`` (its pid) once bound, or
    ``error`` and exits with :data:`EXIT_LISTEN_FAILED` when it cannot bind."""
    threading.current_thread().name = f"receiver-{index}"
    configure_logging(settings.logging.level)
    stop = threading.Event()
    if parent_pid is not None:
        die_with_parent(parent_pid, stop)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us with SIGTERM
    identity = claim_identity(settings.storage.data_dir, RECEIVER)
    engine = make_engine(settings.database_url)
    servers: list[Any] = []
    try:
        ingestor = receiving(settings, engine)
        ledger = Ledger(engine, settings.sender, random.Random(), owner=identity.node_id)
        grace = settings.studies.release_grace_s
        release = None if grace is None else StudyRelease(grace, ParentWakeup(report))
        try:
            servers = start_scp(settings.dicom, ingestor,
                                commitment=CommitmentReports(ledger, settings.sender),
                                release=release,
                                receiver=f"{identity.node_id}:{os.getpid()}")
        except OSError as exc:
            logger.error("receiver process %d cannot listen: %s", index, exc)
            send_report(report, ("error", str(exc)))
            raise SystemExit(EXIT_LISTEN_FAILED) from None
        node_events.record_started(engine, settings, identity.node_id)
        send_report(report, ("listening", os.getpid()))
        stop.wait()
        for server in servers:
            server.shutdown()
        node_events.record_stopped(engine, identity.node_id)
    finally:
        engine.dispose()
        identity.release()
