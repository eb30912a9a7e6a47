"""Exactly one scheduler per database: a lock held for the life of the scheduler process.

The scheduled duties (evaluation jobs, retention, audit forwarding) must run once however
many scheduler processes are started. On PostgreSQL the holder keeps a session-level
``pg_try_advisory_lock`` on a connection of its own (the server drops it when that session
ends: the process died or lost the database); on SQLite an ``fcntl`` lock on a file next
to the database file (the kernel drops it when the process dies, kill -9 included). A
second scheduler waits, trying every ``poll_s``, and takes over when the first is gone.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.roles import try_flock

logger = logging.getLogger(__name__)

# pg advisory lock key: "dicom-node scheduler" (any constant, the same in every process)
ADVISORY_KEY = 0x44434D5343484544


class SchedulerLock:
    """``acquire(stop)`` blocks until this process holds the lock (True) or ``stop`` is
    set (False); ``held()`` says whether it still does (PostgreSQL: the session answers)."""

    def __init__(self, engine: Engine, poll_s: float = 1.0) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self._conn: Any = None  # PostgreSQL: the session that holds the advisory lock
        self._fd = -1  # SQLite: the locked file
        self.path: Path | None = None
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            if not database or database == ":memory:":
                raise ValueError("the scheduler lock needs an SQLite database file")
            self.path = Path(database).with_name(Path(database).name + ".scheduler.lock")

    def try_acquire(self) -> bool:
        if self.path is not None:
            fd = try_flock(self.path)
            if fd is None:
                return False
            self._fd = fd
            return True
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                    {"k": ADVISORY_KEY}).scalar())
            conn.commit()  # the lock is session-level: it outlives this transaction
        except SQLAlchemyError:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def acquire(self, stop: threading.Event) -> bool:
        waiting_logged = False
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
            except SQLAlchemyError as exc:
                logger.warning("scheduler lock: database unavailable (%s); retrying",
                               type(exc).__name__)
            if not waiting_logged:
                logger.info("another scheduler holds the lock; this one waits to take over")
                waiting_logged = True
            stop.wait(self.poll_s)
        return False

    def held(self) -> bool:
        if self.path is not None:
            return self._fd >= 0
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1")).scalar()
            self._conn.commit()
        except SQLAlchemyError:
            return False
        return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
                self._conn.commit()
            except SQLAlchemyError:
                pass  # the session is gone, and the lock with it
            self._conn.close()
            self._conn = None
