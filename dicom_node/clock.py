"""Now for deadlines: the database's clock, and the takeover rule that survives its jumps.

Every persisted deadline (a job's or a delivery's ``lease_expires_at``, a retry's
``next_attempt_at``) is written and compared in ONE time base, the database's clock, so
that hosts whose clocks disagree agree on what is due: PostgreSQL's
``clock_timestamp()``; SQLite, whose one file is used by one host, the host's time.
:class:`Clock` is the one owner of that reading; its source is injectable (tests inject one
that jumps).

A clock can still jump (NTP stepping, a VM resumed, an operator). Forward by an hour, every
lease looks expired at once, and a claimer that trusted ``lease_expires_at`` alone would
take over live jobs and run them twice. So an expired lease is taken over only when it is
*also* stale by the claimer's own monotonic clock (:class:`LeaseWatch`): each renewal bumps
the row's ``lease_seq``; a claimer records the ``lease_seq`` it first saw on an expired
lease and takes the row over only once it has seen that same number for ``lease_s`` of its
own ``time.monotonic()``. A live owner renews every ``heartbeat_s`` (< ``lease_s``), so the
number moves and it is never taken over, whatever the clocks did; a dead owner's lease is
taken over between ``lease_s`` and about ``2 x lease_s`` (plus a poll) after its last
renewal. Monotonic time never jumps and is never compared across hosts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from sqlalchemy import Engine, text

from dicom_node.store import db

TimeSource = Callable[[], float]

_POSTGRES_NOW = text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")


def _host_time() -> float:
    """``time.time`` looked up at each call, so a stepped host clock (or a test that patches
    it) is what the node sees, as it would see PostgreSQL's."""
    return time.time()


def database_time(engine: Engine) -> TimeSource:
    """The database's clock as UNIX seconds: PostgreSQL asked each time (one round trip),
    SQLite (one host by construction) the host's ``time.time``."""
    if engine.dialect.name != "postgresql":
        return _host_time

    def postgres_now() -> float:
        with db.reading(engine) as conn:
            return float(conn.execute(_POSTGRES_NOW).scalar_one())

    return postgres_now


class Clock:
    """Where "now" comes from for persisted deadlines (``now``) and for the claimer's own
    elapsed time (``monotonic``). ``source`` overrides the database's clock (tests)."""

    def __init__(self, engine: Engine | None = None, *, source: TimeSource | None = None,
                 monotonic: TimeSource = time.monotonic) -> None:
        if source is None:
            source = database_time(engine) if engine is not None else time.time
        self._source = source
        self._monotonic = monotonic

    def now(self) -> float:
        """UNIX seconds on the database's clock: what deadlines are written and compared in."""
        return self._source()

    def monotonic(self) -> float:
        """This process's monotonic seconds (never jumps; meaningless on another host)."""
        return self._monotonic()


class LeaseWatch:
    """One claimer's sightings of expired leases: ``{row id: (lease_seq, first seen)}``.

    :meth:`ripe` is fed the expired leases of a claim (id -> ``lease_seq``) and answers
    which of them this claimer may take over: those whose ``lease_seq`` it has seen
    unchanged for at least ``lease_s`` of its monotonic time. A row not in the feed (renewed
    into the future, finished, taken by someone else) is forgotten, so a later expiry starts
    a fresh watch. Thread-safe (the worker threads of one process share their queue).
    """

    def __init__(self, lease_s: float, clock: Clock) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self._seen: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def ripe(self, expired: Mapping[int, int]) -> dict[int, int]:
        """Of ``expired`` (id -> lease_seq), those stale for ``lease_s``: id -> lease_seq."""
        mono = self.clock.monotonic()
        ready: dict[int, int] = {}
        with self._lock:
            seen = {}
            for row_id, seq in expired.items():
                first = self._seen.get(row_id)
                since = first[1] if first is not None and first[0] == seq else mono
                seen[row_id] = (seq, since)
                if mono - since >= self.lease_s:
                    ready[row_id] = seq
            self._seen = seen
        return ready
