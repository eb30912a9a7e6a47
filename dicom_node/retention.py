"""Retention: removes spool files of finished studies by age and by disk use.

Rules (``storage.retention``):

* Only studies in a terminal state (done, ignored, failed) are touched; a study that is
  receiving, queued or analysing keeps every file.
* By age: studies whose last state change (``studies.updated_at``: analysed, ignored, failed)
  is older than ``max_age_days``.
* By disk use: while the spool's filesystem is fuller than ``max_disk_used_pct``, the
  oldest finished studies first, whatever their age.
* Received images go; a result object (SR, SC, GSPS) goes only once **every** delivery of
  it is final: ``committed``, or ``sent`` to a destination that does not ask for storage
  commitment (and was not asked to commit it). Pending, sending, retrying, dead and
  not-accepted deliveries keep their object, as does a result that has no delivery at all
  (no destination configured: the node is where it is read, ``dicom-node export``).
* Rows stay as the record: ``purged_at`` is set on ``instances`` and ``outputs``; each
  purged study gets one ``retention_purged`` audit event. Cached dashboard thumbnails of
  purged objects go too.

Files are removed inside the transaction that marks their rows (SQLite's write lock, or the
study row locked on PostgreSQL), so a late image cannot bring a study back to life between
the check and the removal. A crash after the removal and before the commit leaves rows
unmarked whose files are gone; the next round marks them (removal tolerates a missing file).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, not_, or_, select, update

from dicom_node.audit import AuditKind, Outcome, record
from dicom_node.config import Destination, RetentionSettings
from dicom_node.disk import DiskUsageSource
from dicom_node.errors import SpoolError
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.store.states import DeliveryState, StudyState

logger = logging.getLogger(__name__)

TERMINAL_STUDIES = (StudyState.DONE, StudyState.IGNORED, StudyState.FAILED)
_PAGE = 200


@dataclass
class PurgeReport:
    studies: int = 0
    instances: int = 0
    outputs: int = 0
    bytes: int = 0

    def __bool__(self) -> bool:  # something was purged: look again at once
        return self.studies > 0

    def add(self, other: PurgeReport) -> None:
        self.studies += other.studies
        self.instances += other.instances
        self.outputs += other.outputs
        self.bytes += other.bytes


class Retention:
    def __init__(self, engine: Engine, spool: Spool, settings: RetentionSettings,
                 destinations: Sequence[Destination], disk_usage: DiskUsageSource, *,
                 thumbs_dir: Path | None = None) -> None:
        self.engine = engine
        self.spool = spool
        self.settings = settings
        self.disk_usage = disk_usage
        self.thumbs_dir = thumbs_dir
        self.commit_required = sorted(d.name for d in destinations if d.storage_commitment)

    # ---- what may go -------------------------------------------------------------------

    def _delivery_final(self) -> Any:
        d = db.deliveries.c
        uncommitted = and_(d.commit_requested_at.is_not(None), d.committed_at.is_(None))
        sent_final = and_(d.state == DeliveryState.SENT, not_(uncommitted),
                          d.destination.not_in(self.commit_required))
        return or_(d.state == DeliveryState.COMMITTED, sent_final)

    def _purgeable_output(self) -> Any:
        """Not yet purged, delivered somewhere, and no delivery that is not final."""
        o, d = db.outputs.c, db.deliveries.c
        return and_(o.purged_at.is_(None),
                    exists().where(d.output_id == o.id),
                    not_(exists().where(and_(d.output_id == o.id,
                                             not_(self._delivery_final())))))

    def _candidates(self, older_than: float | None) -> Iterator[str]:
        """Finished studies with something purgeable, oldest first."""
        s, i, o = db.studies.c, db.instances.c, db.outputs.c
        cond = [s.state.in_(TERMINAL_STUDIES), or_(
            exists().where(and_(i.study_uid == s.study_uid, i.purged_at.is_(None))),
            exists().where(and_(o.study_uid == s.study_uid, self._purgeable_output())))]
        if older_than is not None:
            cond.append(s.updated_at < older_than)
        seen: set[str] = set()
        while True:
            with db.reading(self.engine) as conn:
                uids = [r.study_uid for r in conn.execute(
                    select(s.study_uid).where(*cond)
                    .order_by(s.updated_at, s.study_uid).limit(_PAGE + len(seen)))]
            fresh = [u for u in uids if u not in seen]
            if not fresh:
                return
            for uid in fresh:
                seen.add(uid)
                yield uid

    # ---- one round ---------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> PurgeReport:
        report = PurgeReport()
        if not self.settings.enabled:
            return report
        now = time.time() if now is None else now
        days = self.settings.max_age_days
        if days is not None:
            for uid in self._candidates(older_than=now - days * 86400):
                report.add(self.purge_study(uid, f"older than {days:g} d", now))
        limit = self.settings.max_disk_used_pct
        # the candidates (every finished study with something left) are searched only when
        # the disk is above the limit: below it, a round reads nothing
        if limit is not None and self.disk_usage().used_pct > limit:
            for uid in self._candidates(older_than=None):
                usage = self.disk_usage()
                if usage.used_pct <= limit:
                    break
                report.add(self.purge_study(
                    uid, f"disk {usage.used_pct:.1f} % used, above {limit:g} %", now))
        if report.studies:
            logger.info("retention: %d stud%s purged (%d image(s), %d result object(s), "
                        "%d B)", report.studies, "y" if report.studies == 1 else "ies",
                        report.instances, report.outputs, report.bytes)
        return report

    def purge_study(self, study_uid: str, why: str, now: float) -> PurgeReport:
        """Remove what may go of one study, in one transaction with its audit event."""
        s, i, o = db.studies.c, db.instances.c, db.outputs.c
        state_q = select(s.state).where(s.study_uid == study_uid)
        if not db.is_sqlite(self.engine):
            state_q = state_q.with_for_update()
        with self.engine.begin() as conn:
            if conn.execute(state_q).scalar_one_or_none() not in TERMINAL_STUDIES:
                return PurgeReport()
            images = conn.execute(select(i.id, i.path).where(i.study_uid == study_uid)
                                  .where(i.purged_at.is_(None))).all()
            results = conn.execute(select(o.id, o.path).where(o.study_uid == study_uid)
                                   .where(self._purgeable_output())).all()
            if not images and not results:
                return PurgeReport()
            if images:
                conn.execute(update(db.instances).where(i.id.in_([r.id for r in images]))
                             .values(purged_at=now))
            if results:
                conn.execute(update(db.outputs).where(o.id.in_([r.id for r in results]))
                             .values(purged_at=now))
            kept = self._kept_outputs(conn, study_uid)
            size = sum(self._remove(r.path) for r in [*images, *results])
            self._remove_thumbnails([r.id for r in images], [r.id for r in results])
            detail = (f"{why}: {len(images)} image(s), {len(results)} result object(s), "
                      f"{size} B removed")
            if kept:
                detail += f"; {kept} result object(s) kept (undelivered, uncommitted or local)"
            record(conn, AuditKind.RETENTION_PURGED, Outcome.SUCCESS, actor="retention",
                   subject=study_uid, detail=detail, at=now)
        return PurgeReport(1, len(images), len(results), size)

    def _kept_outputs(self, conn: Connection, study_uid: str) -> int:
        o = db.outputs.c
        return len(conn.execute(select(o.id).where(o.study_uid == study_uid)
                                .where(o.purged_at.is_(None))).all())

    def _remove(self, relpath: str) -> int:
        try:
            path = self.spool.path(relpath)
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0
        except (OSError, SpoolError) as exc:
            logger.warning("retention could not remove %s: %s", relpath, exc)
            return 0

    def _remove_thumbnails(self, instance_ids: list[int], output_ids: list[int]) -> None:
        if self.thumbs_dir is None or not self.thumbs_dir.is_dir():
            return
        for prefix, ids in (("instance", instance_ids), ("output", output_ids)):
            for n in ids:
                for thumb in self.thumbs_dir.glob(f"{prefix}-{n}-*.png"):
                    thumb.unlink(missing_ok=True)
