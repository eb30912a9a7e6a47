"""The audit trail, read-only: ``GET /api/v1/audit`` (JSON, filtered and paged) and the
dashboard page ``/dashboard/audit`` (a table, filtered by kind and outcome).

Events are written by the parts of the node that make them true (:mod:`dicom_node.audit`);
they hold UIDs, internal ids, AE titles and addresses, never patient identifiers, and
``detail`` was scrubbed when stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, g, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy import Connection, func, select

from dicom_node.audit import AuditKind, Outcome
from dicom_node.store import db
from dicom_node.web.context import web_context
from dicom_node.web.queries import iso
from dicom_node.web.validation import enum_arg, page_args, query_params, time_range

api_bp = Blueprint("api_audit", __name__, url_prefix="/api/v1")
# a dashboard blueprint: session login and CSRF apply (see auth._is_dashboard)
page_bp = Blueprint("dashboard_audit", __name__, url_prefix="/dashboard")

KINDS = tuple(str(k) for k in AuditKind)
OUTCOMES = tuple(str(o) for o in Outcome)
PAGE_SIZE = 50
_FILTERS = ("kind", "outcome", "since", "until")


@dataclass(frozen=True)
class AuditFilter:
    kind: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_request(cls) -> AuditFilter:
        since, until = time_range("since", "until")
        return cls(kind=enum_arg("kind", KINDS), outcome=enum_arg("outcome", OUTCOMES),
                   since=since, until=until)

    def conditions(self) -> list[Any]:
        a = db.audit_events.c
        cond: list[Any] = []
        if self.kind:
            cond.append(a.kind == self.kind)
        if self.outcome:
            cond.append(a.outcome == self.outcome)
        if self.since is not None:
            cond.append(a.at >= self.since)
        if self.until is not None:
            cond.append(a.at <= self.until)
        return cond


def event_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "at": iso(r.at), "kind": r.kind, "outcome": r.outcome,
            "actor": r.actor, "peer": r.peer, "subject": r.subject, "detail": r.detail}


def list_events(conn: Connection, f: AuditFilter, limit: int, offset: int
                ) -> tuple[list[dict[str, Any]], int]:
    """Newest first (by id: the order events were committed in)."""
    cond = f.conditions()
    total = conn.execute(select(func.count()).select_from(db.audit_events).where(*cond)
                         ).scalar_one()
    rows = conn.execute(select(db.audit_events).where(*cond)
                        .order_by(db.audit_events.c.id.desc()).limit(limit).offset(offset)
                        ).all()
    return [event_dict(r) for r in rows], int(total)


@api_bp.get("/audit")
@query_params("limit", "offset", *_FILTERS)
def api_list() -> ResponseReturnValue:
    p = page_args()
    f = AuditFilter.from_request()
    with db.reading(web_context().engine) as conn:
        items, total = list_events(conn, f, p.limit, p.offset)
    return jsonify({"items": items, "total": total, "limit": p.limit, "offset": p.offset})


@page_bp.get("/audit")
@query_params("limit", "offset", *_FILTERS)
def page() -> ResponseReturnValue:
    g.empty_means_absent = _FILTERS  # the filter form sends its empty fields
    p = page_args(PAGE_SIZE)
    f = AuditFilter.from_request()
    with db.reading(web_context().engine) as conn:
        items, total = list_events(conn, f, p.limit, p.offset)
    args = {k: v for k, v in request.args.items() if k not in ("offset", "limit") and v}
    return render_template("audit.html", items=items, total=total, limit=p.limit,
                           offset=p.offset, args=args, kinds=KINDS, outcomes=OUTCOMES,
                           page="audit")
