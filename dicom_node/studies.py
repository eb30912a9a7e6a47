"""Study assembly: a study is ready ``release_grace_s`` after the association that delivered
it was released (``released``, recorded by :mod:`dicom_node.scp`) when no image of it arrived
since; else once no instance arrived for the quiet period (``quiet``: images over overlapping
associations, an aborted one, a node restarted meanwhile), or at the latest ``max_wait_s``
after the start of its receiving round (``max wait``). Then the selection rules split
its pending instances into an analysis job and recorded ignores. The rules read the header
attributes ingest stored on each instance row (its one parse of the header), so assembly
opens no file; only a row without them (an older database) has its file's header read.
State writes go through :mod:`dicom_node.store.transitions`; in a node on SQLite they run in
the ingest's group commit (``writer``), and the assembler's reads take no lock
(:func:`dicom_node.store.db.reading`).

A *round* starts with a study's first image, or with a late image that re-opens a study
that was already assembled (queued, analysing, done, failed, ignored). A study that never
becomes quiet (a modality reusing one Study Instance UID) is so analysed with what has
arrived; the next round's job analyses every analysable image of the study again and its
result supersedes the earlier one (``dicom_node.versions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, or_, select

from ai.selection import rejection_reason
from dicom_node.config import SelectionSettings
from dicom_node.dicomio import load_selection, quiet, read_untrusted
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.store.group_commit import GroupCommit
from dicom_node.store.states import ACTIVE_JOBS, InstanceState, JobState, StudyState
from dicom_node.store.transitions import (
    create_job,
    failure_reason,
    ignore_instance,
    select_instances,
    set_study_state,
)

logger = logging.getLogger(__name__)


class StudyAssembler:
    """Turns ready studies into jobs. Safe to call repeatedly and after a restart."""

    def __init__(self, engine: Engine, spool: Spool, rules: SelectionSettings,
                 quiet_period_s: float, max_wait_s: float | None = None, *,
                 release_grace_s: float | None = None,
                 on_job: Callable[[], None] | None = None,
                 writer: GroupCommit | None = None, commit_timeout_s: float = 60.0) -> None:
        self.engine = engine
        # the ingest's group commit, when there is one in this process: an assembly's write
        # runs in its next batch, so it never competes with the instance rows for the
        # database's write lock (on SQLite a writer that finds it taken sleeps 1, 2, 5, 10 ms
        # and longer between tries) and shares their fsync; None: a transaction of its own
        self.writer = writer
        self.commit_timeout_s = commit_timeout_s
        self.spool = spool
        self.rules = rules
        self.quiet_period_s = quiet_period_s
        self.max_wait_s = max_wait_s
        self.release_grace_s = release_grace_s  # None: releases are not looked at
        self.on_job = on_job  # a job was created (the node wakes a worker)

    @staticmethod
    def _round_start() -> Any:
        return func.coalesce(db.studies.c.receiving_since, db.studies.c.first_received_at)

    def _why_ready(self, row: Any, now: float) -> str | None:
        """``released``, ``quiet``, ``max wait`` or None for a receiving study's row."""
        released = row.released_at
        if (self.release_grace_s is not None and released is not None
                and released >= row.last_received_at
                and released <= now - self.release_grace_s):
            return "released"
        if row.last_received_at <= now - self.quiet_period_s:
            return "quiet"
        started = row.receiving_since or row.first_received_at
        if self.max_wait_s is not None and started <= now - self.max_wait_s:
            return "max wait"
        return None

    def _ready(self, now: float) -> ColumnElement[bool]:
        """:meth:`_why_ready` as SQL."""
        s = db.studies.c
        ready: ColumnElement[bool] = s.last_received_at <= now - self.quiet_period_s
        if self.release_grace_s is not None:
            ready = or_(ready, and_(s.released_at.is_not(None),
                                    s.released_at >= s.last_received_at,
                                    s.released_at <= now - self.release_grace_s))
        if self.max_wait_s is not None:
            ready = or_(ready, self._round_start() <= now - self.max_wait_s)
        return ready

    def ready_studies(self, now: float) -> list[str]:
        ready = self._ready(now)
        with db.reading(self.engine) as conn:
            rows = conn.execute(
                select(db.studies.c.study_uid)
                .where(db.studies.c.state == StudyState.RECEIVING).where(ready)
                .order_by(db.studies.c.last_received_at)
            ).all()
        return [r.study_uid for r in rows]

    def run_once(self, now: float | None = None) -> list[int]:
        """Assemble every ready study; returns the ids of the jobs created."""
        now = time.time() if now is None else now
        created = []
        for study_uid in self.ready_studies(now):
            job_id = self.assemble(study_uid, now)
            if job_id is not None:
                created.append(job_id)
        return created

    def _classify(self, row: Any) -> str | None:
        """The selection rules on the attributes ingest stored on the row; a row without
        them (an older database, or attributes past the parsed prefix) reads its file once."""
        try:
            with quiet():
                header = load_selection(row.selection)
                if header is None:
                    header = read_untrusted(self.spool.path(row.path), stop_before_pixels=True)
                return rejection_reason(header, self.rules.to_rules())
        except Exception as exc:  # noqa: BLE001 - any unreadable header is a recorded reason
            return f"header unreadable ({type(exc).__name__})"

    @staticmethod
    def _pending_ids(conn: Connection, study_uid: str) -> set[int]:
        return set(conn.execute(select(db.instances.c.id)
                                .where(db.instances.c.study_uid == study_uid)
                                .where(db.instances.c.analysis_state == InstanceState.PENDING))
                   .scalars())

    def assemble(self, study_uid: str, now: float) -> int | None:
        with db.reading(self.engine) as conn:
            pending = conn.execute(
                select(db.instances.c.id, db.instances.c.path, db.instances.c.selection)
                .where(db.instances.c.study_uid == study_uid)
                .where(db.instances.c.analysis_state == InstanceState.PENDING)
            ).all()
        verdicts = {row.id: self._classify(row) for row in pending}
        selected = [i for i, reason in verdicts.items() if reason is None]
        if self.writer is not None:
            decided = self.writer.run(
                lambda conn, _batch: self._decide(conn, study_uid, verdicts, selected, now),
                timeout_s=self.commit_timeout_s)
        else:
            with self.engine.begin() as conn:
                decided = self._decide(conn, study_uid, verdicts, selected, now)
        if decided is None:
            return None  # more arrived meanwhile, or another assembler took it
        job_id, why, round_s = decided
        self._log(study_uid, why, job_id, len(selected), len(verdicts), round_s)
        if job_id is not None and self.on_job is not None:
            self.on_job()  # committed: a worker can claim it
        return job_id

    def _decide(self, conn: Connection, study_uid: str, verdicts: dict[int, str | None],
                selected: list[int], now: float) -> tuple[int | None, str, float] | None:
        """In one transaction: the study claimed, its pending instances selected (a job)
        or ignored. Returns (job id or None, why ready, seconds of the round), or None when
        the study is not (or no longer) this assembler's to assemble."""
        # the study's row is the claim between assemblers (receivers) of several
        # processes: on PostgreSQL a second one waits here and then finds it no longer
        # receiving; SQLite's BEGIN IMMEDIATE already serialises the whole transaction
        claim = select(db.studies).where(db.studies.c.study_uid == study_uid)
        if not db.is_sqlite(self.engine):
            claim = claim.with_for_update()
        study = conn.execute(claim).one()
        why = self._why_ready(study, now) if study.state == StudyState.RECEIVING else None
        if why is None or self._pending_ids(conn, study_uid) != set(verdicts):
            return None
        for inst_id, reason in verdicts.items():
            if reason is not None:
                ignore_instance(conn, inst_id, reason)
        job_id = None
        if selected:
            job_id = create_job(conn, study_uid, now)
            select_instances(conn, selected, job_id)
            set_study_state(conn, study_uid, StudyState.QUEUED, None, now)
        else:
            state, reason = self._state_without_job(conn, study_uid, verdicts)
            set_study_state(conn, study_uid, state, reason, now)
        started = study.receiving_since or study.first_received_at
        return job_id, why, now - started

    @staticmethod
    def _state_without_job(conn: Connection, study_uid: str,
                           verdicts: dict[int, str | None]) -> tuple[StudyState, str]:
        """Nothing new to analyse: the study goes back to what its latest job says."""
        reasons = sorted({r for r in verdicts.values() if r})
        ignored = f"ignored: {'; '.join(reasons) or 'no new instances'}"
        latest = conn.execute(select(db.jobs.c.state, db.jobs.c.error)
                              .where(db.jobs.c.study_uid == study_uid)
                              .order_by(db.jobs.c.id.desc()).limit(1)).first()
        if latest is None:
            return StudyState.IGNORED, ignored
        if latest.state in ACTIVE_JOBS:
            return StudyState.QUEUED, ignored
        if latest.state == JobState.FAILED:
            return StudyState.FAILED, failure_reason(latest.error)
        return StudyState.DONE, ignored

    @staticmethod
    def _log(study_uid: str, why: str, job_id: int | None, selected: int, total: int,
             round_s: float) -> None:
        if job_id is None:
            logger.info("study %s ignored (%s): %d image(s) not analysable", study_uid, why,
                        total)
        elif why == "max wait":
            logger.info("study %s still receiving after %.1f s (max wait): job %d with %d "
                        "new image(s), %d ignored; later images supersede the result",
                        study_uid, round_s, job_id, selected, total - selected)
        else:
            logger.info("study %s ready (%s): job %d with %d image(s), %d ignored", study_uid,
                        why, job_id, selected, total - selected)
