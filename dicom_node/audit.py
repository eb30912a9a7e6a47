"""The audit trail: security-relevant and data events, stored in the database.

Callers pass the connection of the transaction that makes the event true (the instance
row, the delivery state), so an event is recorded exactly when, and only if, it happened,
without an extra commit on the hot path. Values are UIDs, internal ids, AE titles and
network addresses, never patient identifiers; ``detail`` is cut to 500 characters.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum

from sqlalchemy import Connection, Engine, insert

from dicom_node.store import db

logger = logging.getLogger(__name__)


class AuditKind(StrEnum):
    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    ASSOCIATION_ABORTED = "association_aborted"
    INSTANCE_RECEIVED = "instance_received"
    INSTANCE_REFUSED = "instance_refused"
    INSTANCE_QUARANTINED = "instance_quarantined"
    DELIVERED = "delivered"
    COMMITTED = "committed"
    NOT_ACCEPTED = "not_accepted"
    DEAD_LETTERED = "dead_lettered"
    RESUBMITTED = "resubmitted"
    LOGIN_FAILED = "login_failed"
    CONFIG_LOADED = "config_loaded"
    RETENTION_PURGED = "retention_purged"
    NODE_STARTED = "node_started"
    NODE_STOPPED = "node_stopped"


class Outcome(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


def _clip(value: object, n: int) -> str | None:
    return None if value is None else str(value)[:n]


def record(conn: Connection, kind: AuditKind, outcome: Outcome = Outcome.SUCCESS, *,
           actor: str | None = None, peer: str | None = None, subject: str | None = None,
           detail: str | None = None, at: float | None = None) -> None:
    """Insert one audit event inside the caller's transaction."""
    conn.execute(insert(db.audit_events).values(
        at=time.time() if at is None else at, kind=str(kind), outcome=str(outcome),
        actor=_clip(actor, 64), peer=_clip(peer, 64), subject=_clip(subject, 128),
        detail=_clip(detail, 500)))


def record_now(engine: Engine, kind: AuditKind, outcome: Outcome = Outcome.SUCCESS,
               **fields: str | None) -> None:
    """Record an event in a transaction of its own (events with no other write)."""
    try:
        with engine.begin() as conn:
            record(conn, kind, outcome, **fields)
    except Exception:  # noqa: BLE001 - auditing must not take the service down
        logger.exception("audit event %s could not be stored", kind)
