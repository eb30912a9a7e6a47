"""Analysis jobs: claimed with a lease so that a crashed worker's job is re-run.

A claim sets ``state='running'`` with ``lease_expires_at``; a running job whose lease has
expired is claimable again. At start-up the node re-queues every running job of its own
(no thread of a fresh process can hold one). On PostgreSQL the claim uses
``FOR UPDATE SKIP LOCKED`` so several processes or hosts can share the queue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import Engine, and_, or_, select, update

from dicom_node import db
from dicom_node.phi import redact

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_uid: str
    attempts: int
    owner: str


class JobQueue:
    def __init__(self, engine: Engine, *, lease_s: float, max_attempts: int) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    def requeue_owned_by(self, owner_prefix: str) -> int:
        """Start-up recovery: jobs this node was running when it died go back to the queue."""
        with self.engine.begin() as conn:
            res = conn.execute(update(db.jobs)
                               .where(db.jobs.c.state == "running")
                               .where(db.jobs.c.lease_owner.like(f"{owner_prefix}%"))
                               .values(state="queued", lease_owner=None, lease_expires_at=None))
        if res.rowcount:
            logger.warning("re-queued %d interrupted job(s)", res.rowcount)
        return res.rowcount

    def claim(self, owner: str, now: float | None = None) -> ClaimedJob | None:
        now = time.time() if now is None else now
        claimable = or_(db.jobs.c.state == "queued",
                        and_(db.jobs.c.state == "running", db.jobs.c.lease_expires_at < now))
        query = select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.attempts).where(
            claimable).order_by(db.jobs.c.id).limit(1)
        if not db.is_sqlite(self.engine):
            query = query.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            attempts = row.attempts + 1
            conn.execute(update(db.jobs).where(db.jobs.c.id == row.id).values(
                state="running", attempts=attempts, lease_owner=owner,
                lease_expires_at=now + self.lease_s, started_at=now))
            conn.execute(update(db.studies).where(db.studies.c.study_uid == row.study_uid)
                         .where(db.studies.c.state == "queued")
                         .values(state="analysing", updated_at=now))
        return ClaimedJob(row.id, row.study_uid, attempts, owner)

    def still_owned(self, conn, job: ClaimedJob) -> bool:  # type: ignore[no-untyped-def]
        row = conn.execute(select(db.jobs.c.state, db.jobs.c.lease_owner)
                           .where(db.jobs.c.id == job.id)).one()
        return row.state == "running" and row.lease_owner == job.owner

    def fail(self, job: ClaimedJob, error: str, *, permanent: bool) -> str:
        """Record a failure: re-queue while attempts remain, else mark failed (dead letter)."""
        error = redact(error) or ""  # an exception message can quote a header value
        now = time.time()
        dead = permanent or job.attempts >= self.max_attempts
        state = "failed" if dead else "queued"
        with self.engine.begin() as conn:
            if not self.still_owned(conn, job):
                return "lost"
            conn.execute(update(db.jobs).where(db.jobs.c.id == job.id).values(
                state=state, error=error[:2000], lease_owner=None, lease_expires_at=None,
                finished_at=now if dead else None))
            if dead:
                conn.execute(update(db.studies).where(db.studies.c.study_uid == job.study_uid)
                             .where(db.studies.c.state == "analysing")
                             .values(state="failed", reason=f"analysis failed: {error[:500]}",
                                     updated_at=now))
        log = logger.error if dead else logger.warning
        log("job %d (study %s) attempt %d failed%s: %s", job.id, job.study_uid, job.attempts,
            " permanently" if dead else ", will retry", error)
        return state
