"""Delivery of result objects to the configured destinations (C-STORE SCU).

Each (output, destination) pair is a persisted delivery: pending -> sending -> sent, or back
to pending with exponential backoff and jitter after a failure, and dead after
``max_attempts``. Dead deliveries can be resubmitted. The same file, hence the same SOP
Instance UID, is sent on every attempt.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import Engine, and_, or_, select, update

from dicom_node import backoff, db
from dicom_node.config import Destination, SenderSettings
from dicom_node.net import set_nodelay
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings


@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    attempts: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str


def backoff_delay(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """Delay before the next try after ``attempts`` failed ones (``dicom_node.backoff``)."""
    return backoff.backoff_delay(attempts, initial_s=settings.backoff_initial_s,
                                 max_s=settings.backoff_max_s, jitter=settings.jitter, rng=rng)


class Sender:
    def __init__(self, engine: Engine, spool: Spool, destinations: list[Destination],
                 settings: SenderSettings, calling_ae: str, *, seed: int | None = None) -> None:
        self.engine = engine
        self.spool = spool
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae
        self.rng = random.Random(seed)

    def recover(self) -> int:
        """Start-up: deliveries caught mid-send by a crash are pending again."""
        with self.engine.begin() as conn:
            res = conn.execute(update(db.deliveries).where(db.deliveries.c.state == "sending")
                               .values(state="pending", lease_expires_at=None))
        return res.rowcount

    def claim(self, now: float) -> list[Delivery]:
        lease = now + self.settings.timeout_s * 4 + 60
        due = or_(and_(db.deliveries.c.state == "pending", db.deliveries.c.next_attempt_at <= now),
                  and_(db.deliveries.c.state == "sending", db.deliveries.c.lease_expires_at < now))
        query = (select(db.deliveries.c.id, db.deliveries.c.destination,
                        db.deliveries.c.attempts, db.outputs.c.path, db.outputs.c.sop_class_uid,
                        db.outputs.c.sop_instance_uid)
                 .join(db.outputs, db.outputs.c.id == db.deliveries.c.output_id)
                 .where(due).order_by(db.deliveries.c.id).limit(200))
        if not db.is_sqlite(self.engine):
            query = query.with_for_update(skip_locked=True, of=db.deliveries)
        with self.engine.begin() as conn:
            rows = conn.execute(query).all()
            if rows:
                conn.execute(update(db.deliveries)
                             .where(db.deliveries.c.id.in_([r.id for r in rows]))
                             .values(state="sending", lease_expires_at=lease))
        return [Delivery(r.id, r.destination, r.attempts, r.path, r.sop_class_uid,
                         r.sop_instance_uid) for r in rows]

    def run_once(self, now: float | None = None) -> int:
        """Send everything due; returns how many deliveries succeeded."""
        batch = self.claim(time.time() if now is None else now)
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        for d in batch:
            by_dest[d.destination].append(d)
        sent = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for d in items:
                    self._failed(d, "destination is no longer configured", None)
                continue
            sent += self._send_batch(dest, items)
        return sent

    def _ae(self, items: list[Delivery]) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.settings.timeout_s
        ae.dimse_timeout = self.settings.timeout_s
        ae.network_timeout = self.settings.timeout_s
        for sop_class in sorted({d.sop_class_uid for d in items}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def _send_batch(self, dest: Destination, items: list[Delivery]) -> int:
        ae = self._ae(items)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        except (OSError, RuntimeError, ValueError) as exc:
            for d in items:
                self._failed(d, f"association failed: {exc}", None)
            return 0
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            for d in items:
                self._failed(d, f"association {why} by {dest.name}", None)
            return 0
        sent = 0
        try:
            for i, d in enumerate(items):
                if not assoc.is_established:
                    for rest in items[i:]:
                        self._failed(rest, "association lost during the batch", None)
                    break
                status = assoc.send_c_store(str(self.spool.path(d.path)))
                code = int(getattr(status, "Status", -1)) if status else None
                if code in SUCCESS_STATUSES:
                    self._sent(d, code)
                    sent += 1
                else:
                    why = ("no response (timeout or abort)" if code is None
                           else f"status 0x{code:04X}")
                    self._failed(d, why, code)
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _sent(self, d: Delivery, code: int) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(db.deliveries).where(db.deliveries.c.id == d.id).values(
                state="sent", attempts=d.attempts + 1, sent_at=now, last_status=code,
                last_error=None, lease_expires_at=None))
        logger.info("delivered %s to %s", d.sop_instance_uid, d.destination)

    def _failed(self, d: Delivery, error: str, code: int | None) -> None:
        attempts = d.attempts + 1
        dead = attempts >= self.settings.max_attempts
        delay = backoff_delay(attempts, self.settings, self.rng)
        with self.engine.begin() as conn:
            conn.execute(update(db.deliveries).where(db.deliveries.c.id == d.id).values(
                state="dead" if dead else "pending", attempts=attempts, last_error=error[:1000],
                last_status=code, next_attempt_at=time.time() + delay, lease_expires_at=None))
        if dead:
            logger.error("delivery %d of %s to %s dead after %d attempts: %s", d.id,
                         d.sop_instance_uid, d.destination, attempts, error)
        else:
            logger.warning("delivery %d to %s failed (attempt %d, retry in %.1f s): %s", d.id,
                           d.destination, attempts, delay, error)


def resubmit(engine: Engine, *, delivery_ids: list[int] | None = None,
             destination: str | None = None) -> int:
    """Put dead deliveries back in the queue (all, some ids, or one destination's)."""
    query = update(db.deliveries).where(db.deliveries.c.state == "dead")
    if delivery_ids:
        query = query.where(db.deliveries.c.id.in_(delivery_ids))
    if destination:
        query = query.where(db.deliveries.c.destination == destination)
    with engine.begin() as conn:
        res = conn.execute(query.values(state="pending", attempts=0, next_attempt_at=time.time(),
                                        last_error=None))
    logger.info("resubmitted %d dead deliveries", res.rowcount)
    return res.rowcount
