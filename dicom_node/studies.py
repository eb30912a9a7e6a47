"""Study assembly: a study is ready once no instance arrived for the quiet period; then the
selection rules split its pending instances into an analysis job and recorded ignores."""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine, insert, select, update

from dicom_node import db
from dicom_node.config import SelectionSettings
from dicom_node.dicomio import quiet, read_untrusted
from dicom_node.selection import rejection_reason
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)


class StudyAssembler:
    """Turns quiet studies into jobs. Safe to call repeatedly and after a restart."""

    def __init__(self, engine: Engine, spool: Spool, rules: SelectionSettings,
                 quiet_period_s: float) -> None:
        self.engine = engine
        self.spool = spool
        self.rules = rules
        self.quiet_period_s = quiet_period_s

    def ready_studies(self, now: float) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.studies.c.study_uid)
                .where(db.studies.c.state == "receiving")
                .where(db.studies.c.last_received_at <= now - self.quiet_period_s)
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

    def _classify(self, relpath: str) -> str | None:
        try:
            with quiet():
                ds = read_untrusted(self.spool.path(relpath), stop_before_pixels=True)
                return rejection_reason(ds, self.rules)
        except Exception as exc:  # noqa: BLE001 - any unreadable header is a recorded reason
            return f"header unreadable ({type(exc).__name__})"

    def assemble(self, study_uid: str, now: float) -> int | None:
        with self.engine.connect() as conn:
            pending = conn.execute(
                select(db.instances.c.id, db.instances.c.path, db.instances.c.sop_instance_uid)
                .where(db.instances.c.study_uid == study_uid)
                .where(db.instances.c.analysis_state == "pending")
            ).all()
        verdicts = {row.id: self._classify(row.path) for row in pending}
        selected = [i for i, reason in verdicts.items() if reason is None]
        with self.engine.begin() as conn:
            state = conn.execute(select(db.studies.c.state, db.studies.c.last_received_at)
                                 .where(db.studies.c.study_uid == study_uid)).one()
            if state.state != "receiving" or state.last_received_at > now - self.quiet_period_s:
                return None  # more arrived meanwhile, or another assembler took it
            for inst_id, reason in verdicts.items():
                if reason is not None:
                    conn.execute(update(db.instances).where(db.instances.c.id == inst_id)
                                 .values(analysis_state="ignored", reason=reason))
            job_id = None
            if selected:
                job_id = conn.execute(insert(db.jobs).values(
                    study_uid=study_uid, state="queued", attempts=0, created_at=now)
                ).inserted_primary_key[0]
                conn.execute(update(db.instances).where(db.instances.c.id.in_(selected))
                             .values(analysis_state="selected", job_id=job_id))
                conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                             .values(state="queued", reason=None, updated_at=now))
            else:
                reasons = sorted({r for r in verdicts.values() if r})
                study_reason = "; ".join(reasons) or "no new instances"
                new_state = "ignored" if not self._has_jobs(conn, study_uid) else "done"
                conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                             .values(state=new_state, reason=f"ignored: {study_reason}",
                                     updated_at=now))
        if job_id is not None:
            logger.info("study %s ready: job %d with %d image(s), %d ignored", study_uid,
                        job_id, len(selected), len(verdicts) - len(selected))
        else:
            logger.info("study %s ignored: %d image(s) not analysable", study_uid, len(verdicts))
        return job_id

    @staticmethod
    def _has_jobs(conn, study_uid: str) -> bool:  # type: ignore[no-untyped-def]
        return conn.execute(select(db.jobs.c.id).where(db.jobs.c.study_uid == study_uid)
                            .limit(1)).first() is not None
