"""The only writers of study, instance and job states (the state machines of
:mod:`dicom_node.store.states`).

Each function is one step of a state machine, written as the statement(s) it always was, on
the caller's connection: the caller owns the transaction, so what committed together still
commits together (an instance row with its study's ``receiving`` and its audit event; a job's
results with its ``done`` and its study's outcome) and what the caller checked under that
transaction (the lease, the pending set) still guards the write. Deciding *which* state
(the assembler's verdicts, the queue's retry policy) stays with the callers; here is only
how a state is written, once.

Delivery states have their own single writer, :mod:`dicom_node.delivery.ledger` (see
:mod:`dicom_node.store`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_node.store import db
from dicom_node.store.states import ACTIVE_JOBS, InstanceState, JobState, StudyState

ERROR_CHARS = 2000  # a job's error is cut to this


# -- instances ------------------------------------------------------------------------------

def add_instance_if_new(conn: Connection, **columns: object) -> bool:
    """A received instance's row, ``pending`` until its study is assembled; False (nothing
    written) when its SOP Instance UID has a row already.

    ``INSERT ... ON CONFLICT DO NOTHING``: the duplicate check is the insert itself, so a new
    instance (the common case) costs no SELECT first. Whether a row was written is read from
    ``RETURNING``, not ``rowcount``: with psycopg, SQLAlchemy's implicit RETURNING leaves
    ``rowcount`` at -1 for an insert that did write its row.
    """
    dialect_insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(
        conn.dialect.name)
    if dialect_insert is None:
        raise NotImplementedError(f"no ON CONFLICT insert for {conn.dialect.name}")
    stmt = (dialect_insert(db.instances)
            .values(**columns, analysis_state=InstanceState.PENDING)
            .on_conflict_do_nothing(index_elements=[db.instances.c.sop_instance_uid])
            .returning(db.instances.c.id))
    return conn.execute(stmt).first() is not None


def ignore_instance(conn: Connection, instance_id: int, reason: str) -> None:
    """The selection rules said no (``reason``)."""
    conn.execute(update(db.instances).where(db.instances.c.id == instance_id)
                 .values(analysis_state=InstanceState.IGNORED, reason=reason))


def select_instances(conn: Connection, instance_ids: Sequence[int], job_id: int) -> None:
    """Selected for analysis by job ``job_id``."""
    conn.execute(update(db.instances).where(db.instances.c.id.in_(instance_ids))
                 .values(analysis_state=InstanceState.SELECTED, job_id=job_id))


def fail_instance(conn: Connection, instance_id: int, reason: str) -> None:
    """Its pixel data could not be analysed; the rest of its job went on."""
    conn.execute(update(db.instances).where(db.instances.c.id == instance_id)
                 .values(analysis_state=InstanceState.FAILED, reason=reason))


def analysed_instances(conn: Connection, instance_ids: Sequence[int]) -> None:
    conn.execute(update(db.instances).where(db.instances.c.id.in_(instance_ids))
                 .values(analysis_state=InstanceState.ANALYSED))


def reset_instances(conn: Connection, study_uid: str) -> int:
    """Every instance of the study ``pending`` again (re-analysis); returns how many."""
    res = conn.execute(update(db.instances).where(db.instances.c.study_uid == study_uid)
                       .values(analysis_state=InstanceState.PENDING, reason=None, job_id=None))
    return res.rowcount


# -- studies --------------------------------------------------------------------------------

def touch_study(conn: Connection, study_uid: str, now: float) -> None:
    """An instance arrived: the study is receiving (again) and waits for its quiet period.

    A study that was not receiving starts a new round at ``now``; its analysis will cover
    the earlier images too and supersede the earlier result.
    """
    round_start = case((db.studies.c.state == StudyState.RECEIVING,
                        func.coalesce(db.studies.c.receiving_since,
                                      db.studies.c.first_received_at)), else_=now)
    res = conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid).values(
        state=StudyState.RECEIVING, reason=None, last_received_at=now, updated_at=now,
        receiving_since=round_start))
    if res.rowcount == 0:
        conn.execute(insert(db.studies).values(
            study_uid=study_uid, state=StudyState.RECEIVING, first_received_at=now,
            last_received_at=now, updated_at=now, receiving_since=now))


def release_studies(conn: Connection, study_uids: Sequence[str], now: float) -> int:
    """The association that delivered images of these studies was released at ``now``
    (and no other open one delivered images of them): a receiving study becomes ready
    ``studies.release_grace_s`` later unless another image arrives first. Returns how many
    studies it marked."""
    res = conn.execute(update(db.studies).where(db.studies.c.study_uid.in_(study_uids))
                       .where(db.studies.c.state == StudyState.RECEIVING)
                       .values(released_at=now))
    return res.rowcount


def set_study_state(conn: Connection, study_uid: str, state: StudyState, reason: str | None,
                    now: float) -> None:
    """The assembler's outcome for a study (queued with a job, or what its latest job says)."""
    conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                 .values(state=state, reason=reason, updated_at=now))


def reopen_study(conn: Connection, study_uid: str, now: float) -> None:
    """Re-analysis asked: receiving again, so the assembler builds a new job."""
    conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                 .values(state=StudyState.RECEIVING, reason=None, updated_at=now))


def settle_study(conn: Connection, study_uid: str, job_id: int, outcome: StudyState,
                 reason: str | None, now: float) -> None:
    """After job ``job_id`` ended: the study takes ``outcome`` unless another of its jobs is
    still to run (then it stays ``queued``) or new images re-opened it (``receiving``)."""
    pending = conn.execute(select(db.jobs.c.id).where(db.jobs.c.study_uid == study_uid)
                           .where(db.jobs.c.id != job_id)
                           .where(db.jobs.c.state.in_(ACTIVE_JOBS)).limit(1)).first()
    state, why = (StudyState.QUEUED, None) if pending is not None else (outcome, reason)
    conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                 .where(db.studies.c.state.in_((StudyState.QUEUED, StudyState.ANALYSING)))
                 .values(state=state, reason=why, updated_at=now))


def failure_reason(error: str | None) -> str:
    """The reason a study shows when its analysis failed."""
    return f"analysis failed: {(error or 'unknown error')[:500]}"


# -- jobs -----------------------------------------------------------------------------------

def create_job(conn: Connection, study_uid: str, now: float) -> int:
    """A ``queued`` job for the study; returns its id."""
    return conn.execute(insert(db.jobs).values(
        study_uid=study_uid, state=JobState.QUEUED, attempts=0, created_at=now)
    ).inserted_primary_key[0]


def start_job(conn: Connection, job_id: int, study_uid: str, *, attempts: int, owner: str,
              lease_expires_at: float, version: int, now: float) -> None:
    """Claimed: ``running`` under ``owner``'s lease; a queued study is ``analysing``."""
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=JobState.RUNNING, attempts=attempts, lease_owner=owner,
        lease_expires_at=lease_expires_at, started_at=now, next_attempt_at=None,
        version=version))
    conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                 .where(db.studies.c.state == StudyState.QUEUED)
                 .values(state=StudyState.ANALYSING, updated_at=now))


def requeue_interrupted(conn: Connection, job_id: int) -> None:
    """The node stopped while running it: ``queued`` at once, its attempts kept."""
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=JobState.QUEUED, lease_owner=None, lease_expires_at=None,
        next_attempt_at=None,
        error="interrupted: the node stopped while running it"))


def retry_job(conn: Connection, job_id: int, error: str, next_attempt_at: float) -> None:
    """A failed try with attempts left: ``queued`` again, due after its backoff."""
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=JobState.QUEUED, error=error[:ERROR_CHARS], lease_owner=None,
        lease_expires_at=None, next_attempt_at=next_attempt_at))


def fail_job(conn: Connection, job_id: int, study_uid: str, error: str, now: float) -> None:
    """A job failed for good (dead letter) with ``error``; the study shows the reason."""
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=JobState.FAILED, error=error[:ERROR_CHARS], lease_owner=None,
        lease_expires_at=None, next_attempt_at=None, finished_at=now))
    settle_study(conn, study_uid, job_id, StudyState.FAILED, failure_reason(error), now)


def finish_job(conn: Connection, job_id: int, study_uid: str, duration_s: float,
               now: float) -> None:
    """The job's results are committed (same transaction): ``done``, and its study settles."""
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=JobState.DONE, finished_at=now, lease_owner=None, lease_expires_at=None,
        error=None, duration_s=duration_s))
    settle_study(conn, study_uid, job_id, StudyState.DONE, None, now)
