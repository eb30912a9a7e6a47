"""Wake-ups between processes on PostgreSQL: ``NOTIFY`` after a hand-over commits, ``LISTEN``
where the next loop runs.

Within one process the loops hand over through :mod:`dicom_node.wakeups`. With the roles in
separate processes (:mod:`dicom_node.roles`) a receiver that queued a job, or a worker that
committed results, tells the other processes through the database: ``pg_notify`` on a
channel, received by a listener thread on a connection of its own, which sets the local
wake-up. A notification is only a hint: it carries nothing, a lost one (listener
reconnecting) costs one poll interval, and the polls stay the safety net. SQLite has no such
channel: there the poll intervals are the hand-over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

logger = logging.getLogger(__name__)

JOBS = "dicom_node_jobs"  # a job was queued: workers claim
DELIVERIES = "dicom_node_deliveries"  # results were committed: senders send
RECONNECT_S = 5.0


def supported(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def notify(engine: Engine, channel: str) -> None:
    """Tell the listeners of ``channel``; a failure only costs them a poll interval."""
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})
    except SQLAlchemyError as exc:
        logger.debug("NOTIFY %s failed (%s); the listeners will poll", channel,
                     type(exc).__name__)


class Listener:
    """A thread that LISTENs on the channels of ``handlers`` and calls the handler of each
    notification received, until ``stop``; it reconnects after a lost connection."""

    def __init__(self, engine: Engine, handlers: dict[str, Callable[[], None]],
                 stop: threading.Event) -> None:
        self.dsn = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.handlers = handlers
        self.stop = stop
        self.listening = threading.Event()  # set while LISTEN is in force (tests)

    def run(self) -> None:
        import psycopg  # the PostgreSQL driver: only where PostgreSQL is used
        from psycopg import sql

        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    for channel in self.handlers:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening.set()
                    while not self.stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.handlers[note.channel]()
            except psycopg.Error as exc:
                self.listening.clear()
                logger.warning("database notifications lost (%s); polling until they are "
                               "back", type(exc).__name__)
                self.stop.wait(RECONNECT_S)
