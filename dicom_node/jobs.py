"""Analysis jobs: claimed with a lease, kept alive by a heartbeat, retried with a backoff.

A claim sets ``state='running'`` with ``lease_expires_at`` and counts the attempt; while the
job runs, a heartbeat thread renews the lease (only while this owner still holds the job).
A running job whose lease has expired is claimable again (its worker died). A failed try
goes back to ``queued`` with ``next_attempt_at`` after an exponential backoff with jitter;
only due jobs are claimed. Attempts are counted across restarts: at start-up the node's
own interrupted jobs keep their count, and a job that reached ``max_attempts`` (one that
kills the process every time, say) ends ``failed`` with the reason instead of looping.

Jobs of one study run one after the other (a later job waits for the earlier ones): each
produces the next *version* of the study's result (``jobs.version``, set at claim), see
``dicom_node.versions``.

Persisted deadlines are UNIX seconds on the database's clock (:class:`dicom_node.clock.Clock`);
in-process intervals (the heartbeat) are monotonic. Every claim and renewal bumps the job's
``lease_seq``; an expired lease is taken over only once this queue has seen the same
``lease_seq`` for ``lease_s`` of its own monotonic time (:class:`dicom_node.clock.LeaseWatch`),
so a clock that jumps forward takes no live job away from its worker, and a dead worker's
job is taken over up to about ``2 x lease_s`` after its last renewal. The owner's
completion stays fenced by :meth:`JobQueue.still_owned`. On PostgreSQL the claim uses
``FOR UPDATE SKIP LOCKED`` so several processes or hosts can share the queue.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, false, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.backoff import backoff_delay
from dicom_node.clock import Clock, LeaseWatch
from dicom_node.config import WorkerSettings
from dicom_node.phi import redact
from dicom_node.store import db
from dicom_node.store.states import ACTIVE_JOBS, JobState
from dicom_node.store.transitions import (
    fail_job,
    requeue_interrupted,
    retry_job,
    start_job,
)

logger = logging.getLogger(__name__)

_MAX_GIVE_UPS_PER_CLAIM = 20  # exhausted jobs failed in one claim before it returns


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_uid: str
    attempts: int
    owner: str
    version: int = 1


@dataclass(frozen=True)
class RetryPolicy:
    """How often a job is tried and how long a failed try waits (``workers.*``)."""

    max_attempts: int = 3
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> float:
        return backoff_delay(attempts, initial_s=self.backoff_initial_s,
                             max_s=self.backoff_max_s, jitter=self.jitter, rng=rng)


class JobQueue:
    def __init__(self, engine: Engine, *, lease_s: float, max_attempts: int,
                 heartbeat_s: float | None = None, retry: RetryPolicy | None = None,
                 rng: random.Random | None = None, clock: Clock | None = None) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.clock = clock or Clock(engine)
        self.watch = LeaseWatch(lease_s, self.clock)
        self.heartbeat_s = heartbeat_s or lease_s / 3.0
        self.retry = replace(retry or RetryPolicy(), max_attempts=max_attempts)
        self.rng = rng or random.Random()
        self._held: set[int] = set()  # jobs this queue's workers are running right now
        self._held_lock = threading.Lock()

    @classmethod
    def from_settings(cls, engine: Engine, settings: WorkerSettings,
                      clock: Clock | None = None) -> JobQueue:
        retry = RetryPolicy(settings.max_attempts, settings.backoff_initial_s,
                            settings.backoff_max_s, settings.jitter)
        return cls(engine, lease_s=settings.lease_s, max_attempts=settings.max_attempts,
                   heartbeat_s=settings.heartbeat_interval_s, retry=retry, clock=clock)

    @property
    def max_attempts(self) -> int:
        return self.retry.max_attempts

    # -- recovery -------------------------------------------------------------------------

    def requeue_owned_by(self, owner_prefix: str, now: float | None = None) -> int:
        """Start-up recovery of the jobs this node was running when it died.

        Each keeps its attempt count: it is queued again at once (the restart was the
        pause), or failed with the reason once ``max_attempts`` tries were interrupted, so a
        job that kills the process every time ends failed instead of looping. Returns how
        many jobs were recovered (re-queued or failed).
        """
        now = self.clock.now() if now is None else now
        with self.engine.begin() as conn:
            rows = conn.execute(select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.attempts)
                                .where(db.jobs.c.state == JobState.RUNNING)
                                .where(db.jobs.c.lease_owner.like(f"{owner_prefix}%"))).all()
            for row in rows:
                if row.attempts >= self.max_attempts:
                    give_up(conn, row.id, row.study_uid,
                            f"interrupted {row.attempts} time(s): the node stopped while "
                            f"running it (attempts exhausted)", now)
                else:
                    requeue_interrupted(conn, row.id)
                    logger.warning("re-queued interrupted job %d (study %s) after attempt %d "
                                   "of %d", row.id, row.study_uid, row.attempts,
                                   self.max_attempts)
        return len(rows)

    # -- claim ----------------------------------------------------------------------------

    def _held_ids(self) -> list[int]:
        with self._held_lock:
            return sorted(self._held)

    def _stale(self, conn: Connection, now: float) -> dict[int, int]:
        """Running jobs whose lease expired on the database's clock AND whose ``lease_seq``
        this queue has seen unchanged for ``lease_s`` of its monotonic time: id -> seq."""
        query = (select(db.jobs.c.id, db.jobs.c.lease_seq)
                 .where(db.jobs.c.state == JobState.RUNNING)
                 .where(db.jobs.c.lease_expires_at < now))
        held = self._held_ids()
        if held:  # a thread of this process runs it: never taken over, whatever the clock
            query = query.where(db.jobs.c.id.not_in(held))
        return self.watch.ripe({r.id: r.lease_seq for r in conn.execute(query)})

    def _claimable(self, now: float, stale: dict[int, int]) -> Any:
        earlier = db.jobs.alias("earlier")
        earlier_active = exists().where(earlier.c.study_uid == db.jobs.c.study_uid,
                                        earlier.c.id < db.jobs.c.id,
                                        earlier.c.state.in_(ACTIVE_JOBS))
        due = or_(db.jobs.c.next_attempt_at.is_(None), db.jobs.c.next_attempt_at <= now)
        # a stale lease is taken only with the lease_seq that was watched (re-checked under
        # the row lock on PostgreSQL: a renewal since then keeps the job with its owner)
        taken_over = [and_(db.jobs.c.id == job_id, db.jobs.c.lease_seq == seq)
                      for job_id, seq in stale.items()]
        query = (select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.attempts, db.jobs.c.state)
                 .where(or_(and_(db.jobs.c.state == JobState.QUEUED, due),
                            and_(db.jobs.c.state == JobState.RUNNING, or_(false(), *taken_over))))
                 .where(~earlier_active).order_by(db.jobs.c.id).limit(1))
        if not db.is_sqlite(self.engine):
            query = query.with_for_update(skip_locked=True, of=db.jobs)
        return query

    def claim(self, owner: str, now: float | None = None) -> ClaimedJob | None:
        """Take the oldest due job (a queued one, or a running one whose lease expired)."""
        taken = self.claim_many(owner, 1, now)
        return taken[0] if taken else None

    def claim_many(self, owner: str, limit: int, now: float | None = None
                   ) -> list[ClaimedJob]:
        """Take up to ``limit`` due jobs, oldest first, in one transaction (a worker's batch).

        Only jobs already due are taken: this never waits for more to arrive. A later job of
        a study whose earlier job is taken here stays queued (jobs of one study run in order:
        the claim just made is active, so the next query no longer finds it)."""
        now = self.clock.now() if now is None else now
        taken: list[ClaimedJob] = []
        with self.engine.begin() as conn:
            stale = self._stale(conn, now)
            for _ in range(_MAX_GIVE_UPS_PER_CLAIM + limit):
                if len(taken) >= limit:
                    break
                row = conn.execute(self._claimable(now, stale)).first()
                if row is None:
                    break
                stale.pop(row.id, None)
                if row.state == JobState.RUNNING and row.attempts >= self.max_attempts:
                    give_up(conn, row.id, row.study_uid,
                            f"lease expired on attempt {row.attempts}: its worker stopped "
                            f"(attempts exhausted)", now)
                    continue
                taken.append(self._take(conn, row, owner, now))
        return taken

    def _take(self, conn: Connection, row: Any, owner: str, now: float) -> ClaimedJob:
        attempts = row.attempts + 1
        version = 1 + (conn.execute(select(func.max(db.jobs.c.version))
                                    .where(db.jobs.c.study_uid == row.study_uid)
                                    .where(db.jobs.c.state == JobState.DONE)).scalar() or 0)
        start_job(conn, row.id, row.study_uid, attempts=attempts, owner=owner,
                  lease_expires_at=now + self.lease_s, version=version, now=now)
        conn.execute(update(db.jobs).where(db.jobs.c.id == row.id)
                     .values(lease_seq=db.jobs.c.lease_seq + 1))  # a new lease
        return ClaimedJob(row.id, row.study_uid, attempts, owner, version)

    # -- ownership and lease ----------------------------------------------------------------

    def still_owned(self, conn: Connection, job: ClaimedJob) -> bool:
        row = conn.execute(select(db.jobs.c.state, db.jobs.c.lease_owner)
                           .where(db.jobs.c.id == job.id)).one()
        return row.state == JobState.RUNNING and row.lease_owner == job.owner

    def renew(self, job: ClaimedJob, now: float | None = None) -> bool:
        """Push the lease forward; False once the job is no longer running under ``job.owner``."""
        now = self.clock.now() if now is None else now
        with self.engine.begin() as conn:
            res = conn.execute(update(db.jobs).where(db.jobs.c.id == job.id)
                               .where(db.jobs.c.state == JobState.RUNNING)
                               .where(db.jobs.c.lease_owner == job.owner)
                               .values(lease_expires_at=now + self.lease_s,
                                       lease_seq=db.jobs.c.lease_seq + 1))
        return res.rowcount == 1

    def ended(self, job: ClaimedJob) -> bool:
        """The job is done or failed (not running elsewhere, not queued again)."""
        with db.reading(self.engine) as conn:
            state = conn.execute(select(db.jobs.c.state)
                                 .where(db.jobs.c.id == job.id)).scalar_one_or_none()
        return state in (JobState.DONE, JobState.FAILED)

    @contextmanager
    def lease(self, job: ClaimedJob) -> Iterator[Heartbeat]:
        """Hold ``job`` while the block runs: heartbeat renewals, no in-process takeover."""
        heartbeat = Heartbeat(self, job, self.heartbeat_s)
        with self._held_lock:
            self._held.add(job.id)
        heartbeat.start()
        try:
            yield heartbeat
        finally:
            heartbeat.stop()
            with self._held_lock:
                self._held.discard(job.id)

    # -- failure ----------------------------------------------------------------------------

    def fail(self, job: ClaimedJob, error: str, *, permanent: bool,
             now: float | None = None) -> str:
        """Record a failed try: queued again after its backoff while attempts remain, else
        failed (dead letter) with the reason on the job and the study. Returns the new state,
        or ``lost`` when the job was no longer ours."""
        error = redact(error) or ""  # an exception message can quote a header value
        now = self.clock.now() if now is None else now
        dead = permanent or job.attempts >= self.max_attempts
        delay = 0.0 if dead else self.retry.delay(job.attempts, self.rng)
        with self.engine.begin() as conn:
            if not self.still_owned(conn, job):
                return "lost"
            if dead:
                give_up(conn, job.id, job.study_uid, error, now, log=False)
            else:
                retry_job(conn, job.id, error, now + delay)
        if dead:
            logger.error("job %d (study %s) attempt %d failed permanently: %s", job.id,
                         job.study_uid, job.attempts, error)
            return JobState.FAILED
        logger.warning("job %d (study %s) attempt %d of %d failed, next try in %.1f s: %s",
                       job.id, job.study_uid, job.attempts, self.max_attempts, delay, error)
        return JobState.QUEUED


class Heartbeat:
    """Renews one job's lease every ``interval_s`` (monotonic) until stopped or lost."""

    def __init__(self, queue: JobQueue, job: ClaimedJob, interval_s: float) -> None:
        self.queue = queue
        self.job = job
        self.interval_s = interval_s
        self.lost = threading.Event()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-job-{job.id}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):  # Event.wait runs on the monotonic clock
            try:
                owned = self.queue.renew(self.job)
            except SQLAlchemyError as exc:  # the database is busy or away: try next beat
                logger.warning("job %d: lease renewal failed (%s); retrying", self.job.id,
                               type(exc).__name__)
                continue
            if not owned:
                # a renewal racing the job's own commit finds it done: that is no loss
                if not self._stop.is_set() and not self.queue.ended(self.job):
                    logger.warning("job %d lost its lease (taken over or cancelled); its "
                                   "results will be discarded", self.job.id)
                self.lost.set()
                return
            self.renewals += 1


def give_up(conn: Connection, job_id: int, study_uid: str, error: str, now: float, *,
            log: bool = True) -> None:
    """Mark a job failed (dead letter) with ``error``; the study shows the reason."""
    fail_job(conn, job_id, study_uid, error, now)
    if log:
        logger.error("job %d (study %s) failed: %s", job_id, study_uid, error)
