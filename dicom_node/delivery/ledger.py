"""Every state change of a delivery, with its audit event, in one transaction each.

The worker (a new delivery), the sender, the commitment report handler and the resubmit
commands change deliveries only through here, so the state machine of
:class:`~dicom_node.store.states.DeliveryState` has one owner. ``attempts`` counts tries (a
try is one decision about one object: stored, not accepted, failed); the dead letter comes
after ``sender.max_attempts`` of them.

Deadlines (``next_attempt_at``, the claim's ``lease_expires_at``) and the times they are
compared with are the database's clock (:class:`dicom_node.clock.Clock`). A claim bumps
``lease_seq``; a ``sending`` delivery whose sender died is claimed again only once its lease
expired AND this ledger saw the same ``lease_seq`` for the lease's length of its own
monotonic time (:class:`dicom_node.clock.LeaseWatch`), so a clock jump re-sends nothing that
a live sender is still sending.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, false, func, insert, or_, select, update

from dicom_node import backoff
from dicom_node.audit import AuditKind, Outcome, record
from dicom_node.clock import Clock, LeaseWatch
from dicom_node.config import SenderSettings
from dicom_node.store import db
from dicom_node.store.states import DELIVERY_DUE, DeliveryState

logger = logging.getLogger(__name__)

CLAIM_LIMIT = 200
RESUBMITTABLE = (DeliveryState.DEAD, DeliveryState.NOT_ACCEPTED)


@dataclass(frozen=True)
class Delivery:
    """One claimed (output, destination) pair; ``attempts`` as before this try."""

    id: int
    destination: str
    attempts: int
    path: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str = ""  # for the log's one line per study and destination


def backoff_delay(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """Delay before the next try after ``attempts`` failed ones (``dicom_node.backoff``)."""
    return backoff.backoff_delay(attempts, initial_s=settings.backoff_initial_s,
                                 max_s=settings.backoff_max_s, jitter=settings.jitter, rng=rng)


_d, _o = db.deliveries.c, db.outputs.c
_CLAIM_COLUMNS = (_d.id, _d.destination, _d.attempts, _o.path, _o.kind, _o.sop_class_uid,
                  _o.sop_instance_uid, _o.study_uid)


def _delivery(row: Any) -> Delivery:
    return Delivery(row.id, row.destination, row.attempts, row.path, row.kind,
                    row.sop_class_uid, row.sop_instance_uid, row.study_uid or "")


def add_delivery(conn: Connection, output_id: int, destination: str, now: float) -> None:
    """A result object is due to ``destination``: ``pending``, unless a row exists already
    (a re-analysis rebuilding the same object sends nothing twice)."""
    exists = conn.execute(select(db.deliveries.c.id)
                          .where(db.deliveries.c.output_id == output_id)
                          .where(db.deliveries.c.destination == destination)).first()
    if exists is None:
        conn.execute(insert(db.deliveries).values(
            output_id=output_id, destination=destination, state=DeliveryState.PENDING,
            attempts=0, next_attempt_at=now, created_at=now))


class Ledger:
    def __init__(self, engine: Engine, settings: SenderSettings, rng: random.Random,
                 clock: Clock | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.rng = rng
        self.clock = clock or Clock(engine)
        # a claim holds its batch this long (no renewal: a batch ends well within it)
        self.lease_s = settings.timeout_s * 4 + 60
        self.watch = LeaseWatch(self.lease_s, self.clock)

    # -- claiming --------------------------------------------------------------------------

    def recover(self) -> int:
        """Start-up: deliveries caught mid-send by a crash are due again."""
        with self.engine.begin() as conn:
            res = conn.execute(update(db.deliveries).where(_d.state == DeliveryState.SENDING)
                               .values(state=DeliveryState.PENDING, lease_expires_at=None))
        return res.rowcount

    def claim(self, now: float | None = None) -> list[Delivery]:
        """Due deliveries (and those whose sender died mid-send) become ``sending``."""
        now = self.clock.now() if now is None else now
        with self.engine.begin() as conn:
            expired = conn.execute(select(_d.id, _d.lease_seq)
                                   .where(_d.state == DeliveryState.SENDING)
                                   .where(_d.lease_expires_at < now)).all()
            stale = self.watch.ripe({r.id: r.lease_seq for r in expired})
            # taken over only with the lease_seq watched (re-checked under the row lock)
            taken_over = [and_(_d.id == i, _d.lease_seq == seq) for i, seq in stale.items()]
            due = or_(and_(_d.state.in_(DELIVERY_DUE), _d.next_attempt_at <= now),
                      and_(_d.state == DeliveryState.SENDING, or_(false(), *taken_over)))
            query = (select(*_CLAIM_COLUMNS).join(db.outputs, _o.id == _d.output_id)
                     .where(due).order_by(_d.id).limit(CLAIM_LIMIT))
            if not db.is_sqlite(self.engine):
                query = query.with_for_update(skip_locked=True, of=db.deliveries)
            rows = conn.execute(query).all()
            if rows:
                conn.execute(update(db.deliveries).where(_d.id.in_([r.id for r in rows]))
                             .values(state=DeliveryState.SENDING,
                                     lease_expires_at=now + self.lease_s,
                                     lease_seq=_d.lease_seq + 1))
        return [_delivery(r) for r in rows]

    # -- outcomes of one try ---------------------------------------------------------------

    def sent(self, d: Delivery, *, code: int, syntax: str, warning: str | None) -> None:
        """Stored (Success or Warning status)."""
        with self.engine.begin() as conn:
            self._set(conn, d.id, state=DeliveryState.SENT, attempts=d.attempts + 1,
                      sent_at=self.clock.now(), last_status=code, last_error=warning,
                      transfer_syntax=syntax, commit_transaction_uid=None,
                      commit_requested_at=None, committed_at=None)
            record(conn, AuditKind.DELIVERED, Outcome.WARNING if warning else Outcome.SUCCESS,
                   actor=d.destination, subject=d.sop_instance_uid,
                   detail=warning or f"{d.kind} in {syntax}")
        logger.log(logging.WARNING if warning else logging.DEBUG, "delivered %s (%s) to %s%s",
                   d.sop_instance_uid, d.kind, d.destination, f": {warning}" if warning else "")

    def not_accepted(self, d: Delivery, reason: str, code: int | None = None) -> None:
        """Terminal: the destination does not take this object (class or syntax)."""
        with self.engine.begin() as conn:
            self._set(conn, d.id, state=DeliveryState.NOT_ACCEPTED, attempts=d.attempts + 1,
                      last_error=reason[:1000], last_status=code)
            record(conn, AuditKind.NOT_ACCEPTED, Outcome.FAILURE, actor=d.destination,
                   subject=d.sop_instance_uid, detail=reason)
        logger.warning("delivery %d of %s (%s): %s", d.id, d.sop_instance_uid, d.kind, reason)

    def failed(self, d: Delivery, reason: str, code: int | None = None, *,
               dead_letter: bool = True) -> DeliveryState:
        """A failed try: ``retrying`` after a backoff, or ``dead`` once attempts are spent
        (never with ``dead_letter=False``: Out of Resources waits for the PACS to recover)."""
        with self.engine.begin() as conn:
            return self._retry(conn, d.id, d.destination, d.sop_instance_uid, d.attempts + 1,
                               reason, code, dead_letter=dead_letter)

    def dead(self, d: Delivery, reason: str, code: int | None = None) -> None:
        """Unrecoverable at once (the result file is missing or unreadable)."""
        with self.engine.begin() as conn:
            self._dead(conn, d.id, d.destination, d.sop_instance_uid, d.attempts + 1, reason,
                       code)

    def interrupted(self, deliveries: Iterable[Delivery], reason: str) -> None:
        """Deliveries a try could not finish (association lost, unexpected error)."""
        for d in deliveries:
            self.failed(d, reason)

    # -- storage commitment ----------------------------------------------------------------

    def commit_requested(self, deliveries: Sequence[Delivery], transaction_uid: str,
                         now: float) -> None:
        """Recorded before the N-ACTION goes out, so an immediate report finds its rows."""
        with self.engine.begin() as conn:
            conn.execute(update(db.deliveries)
                         .where(_d.id.in_([d.id for d in deliveries]))
                         .where(_d.state == DeliveryState.SENT)
                         .values(commit_transaction_uid=transaction_uid,
                                 commit_requested_at=now))

    def note(self, deliveries: Sequence[Delivery], text: str) -> None:
        """A remark on sent deliveries that changes no state (e.g. commitment refused)."""
        with self.engine.begin() as conn:
            conn.execute(update(db.deliveries).where(_d.id.in_([d.id for d in deliveries]))
                         .values(last_error=text[:1000]))

    def _by_transaction(self, conn: Connection, transaction_uid: str,
                        sop_uids: Iterable[str]) -> list[Any]:
        wanted = list(dict.fromkeys(sop_uids))
        if not wanted:
            return []
        return conn.execute(
            select(_d.id, _d.destination, _d.attempts, _o.sop_instance_uid)
            .join(db.outputs, _o.id == _d.output_id)
            .where(_d.commit_transaction_uid == transaction_uid)
            .where(_o.sop_instance_uid.in_(wanted))
            .where(_d.state.in_((DeliveryState.SENT, DeliveryState.RETRYING)))).all()

    def committed(self, transaction_uid: str, sop_uids: Iterable[str],
                  peer: str | None = None) -> int:
        """The PACS confirmed these objects of the transaction (N-EVENT-REPORT)."""
        now = self.clock.now()
        with self.engine.begin() as conn:
            rows = self._by_transaction(conn, transaction_uid, sop_uids)
            for r in rows:
                self._set(conn, r.id, state=DeliveryState.COMMITTED, committed_at=now,
                          last_error=None)
                record(conn, AuditKind.COMMITTED, actor=r.destination, peer=peer,
                       subject=r.sop_instance_uid, detail=f"transaction {transaction_uid}")
        return len(rows)

    def commit_failed(self, transaction_uid: str, failures: dict[str, int | None],
                      peer: str | None = None) -> int:
        """The PACS refused to commit these objects: re-sent (or dead once spent)."""
        with self.engine.begin() as conn:
            rows = self._by_transaction(conn, transaction_uid, failures)
            for r in rows:
                reason = failures[r.sop_instance_uid]
                why = (f"storage commitment failed"
                       f"{f' (failure reason 0x{reason:04X})' if reason is not None else ''}")
                self._retry(conn, r.id, r.destination, r.sop_instance_uid, r.attempts, why,
                            reason, dead_letter=True)
        return len(rows)

    def commitments_overdue(self, destination: str, timeout_s: float, now: float) -> int:
        """``sent`` to a committing destination and unconfirmed for ``timeout_s``: re-sent
        (a request that never went out counts from the time the object was stored)."""
        asked = func.coalesce(_d.commit_requested_at, _d.sent_at)
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(_d.id, _d.destination, _d.attempts, _o.sop_instance_uid)
                .join(db.outputs, _o.id == _d.output_id)
                .where(_d.destination == destination, _d.state == DeliveryState.SENT,
                       asked < now - timeout_s)).all()
            for r in rows:
                self._retry(conn, r.id, r.destination, r.sop_instance_uid, r.attempts,
                            f"storage commitment not confirmed within {timeout_s:g} s", None,
                            dead_letter=True)
        return len(rows)

    # -- the transitions ---------------------------------------------------------------------

    @staticmethod
    def _set(conn: Connection, delivery_id: int, **values: Any) -> None:
        conn.execute(update(db.deliveries).where(_d.id == delivery_id)
                     .values(lease_expires_at=None, **values))

    def _retry(self, conn: Connection, delivery_id: int, destination: str, sop_uid: str,
               attempts: int, reason: str, code: int | None, *,
               dead_letter: bool) -> DeliveryState:
        if dead_letter and attempts >= self.settings.max_attempts:
            self._dead(conn, delivery_id, destination, sop_uid, attempts,
                       f"{reason} (after {attempts} attempts)", code)
            return DeliveryState.DEAD
        delay = backoff_delay(attempts, self.settings, self.rng)
        self._set(conn, delivery_id, state=DeliveryState.RETRYING, attempts=attempts,
                  last_error=reason[:1000], last_status=code,
                  next_attempt_at=self.clock.now() + delay)
        logger.warning("delivery %d to %s failed (attempt %d, retry in %.1f s): %s",
                       delivery_id, destination, attempts, delay, reason)
        return DeliveryState.RETRYING

    def _dead(self, conn: Connection, delivery_id: int, destination: str, sop_uid: str,
              attempts: int, reason: str, code: int | None) -> None:
        self._set(conn, delivery_id, state=DeliveryState.DEAD, attempts=attempts,
                  last_error=reason[:1000], last_status=code)
        record(conn, AuditKind.DEAD_LETTERED, Outcome.FAILURE, actor=destination,
               subject=sop_uid, detail=reason)
        logger.error("delivery %d of %s to %s dead: %s", delivery_id, sop_uid, destination,
                     reason)


def resubmit(engine: Engine, *, delivery_ids: list[int] | None = None,
             destination: str | None = None, actor: str = "operator",
             clock: Clock | None = None) -> int:
    """Put dead and not-accepted deliveries back in the queue (all, some ids, or one
    destination's): same object, same SOP Instance UID, attempts from zero."""
    query = select(_d.id, _d.destination, _d.state, _o.sop_instance_uid).join(
        db.outputs, _o.id == _d.output_id).where(_d.state.in_(RESUBMITTABLE))
    if delivery_ids:
        query = query.where(_d.id.in_(delivery_ids))
    if destination:
        query = query.where(_d.destination == destination)
    now = (clock or Clock(engine)).now()
    with engine.begin() as conn:
        rows = conn.execute(query).all()
        for r in rows:
            conn.execute(update(db.deliveries).where(_d.id == r.id).values(
                state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                last_error=None, last_status=None, lease_expires_at=None))
            record(conn, AuditKind.RESUBMITTED, actor=actor, subject=r.sop_instance_uid,
                   detail=f"delivery {r.id} to {r.destination} was {r.state}")
    logger.info("resubmitted %d deliveries", len(rows))
    return len(rows)
