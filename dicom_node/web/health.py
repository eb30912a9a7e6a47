"""Liveness and readiness, without authentication (for load balancers and systemd).

``/readyz`` is 200 only when the DICOM listener is up, the model is loaded (each checked
only in a process that runs the receiver or worker role), the database
answers and the spool's filesystem is not fuller than ``storage.high_watermark_pct``;
otherwise 503 with the reasons (no identifiers, no stack traces). Its body also carries the
spool's disk figures.
"""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.disk import DiskUsage, measure
from dicom_node.roles import ALL
from dicom_node.store import db
from dicom_node.web.context import WebContext, web_context
from dicom_node.web.validation import query_params

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@query_params()
def healthz() -> ResponseReturnValue:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@query_params()
def readyz() -> ResponseReturnValue:
    ctx = web_context()
    node = ctx.node
    checks: dict[str, str] = {}
    reasons: list[str] = []
    if node is None:
        checks["listener"] = checks["model"] = "absent"
        reasons.append("no DICOM node runs in this process")
    else:
        roles = getattr(node, "roles", ALL)  # a process of some roles checks only theirs
        if "receiver" in roles:
            # a Node says whether it (or its receiver processes) listens; else its server
            up = getattr(node, "listening", None)
            listening = ((node.server is not None if up is None else bool(up))
                         and not node.stop_event.is_set())
            checks["listener"] = "up" if listening else "down"
            if not listening:
                reasons.append("DICOM listener is not running")
        if "worker" in roles:
            if node.analyzer is not None:
                checks["model"] = "loaded"
            elif node.model_error:
                checks["model"] = "failed"
                reasons.append("model could not be loaded (see the node log)")
            else:
                checks["model"] = "loading"
                reasons.append("model is loading")
    try:
        with db.reading(ctx.engine) as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "up"
    except SQLAlchemyError:
        checks["database"] = "down"
        reasons.append("database does not answer")
    disk = _disk_check(ctx, checks, reasons)
    ready = not reasons
    body = {"status": "ready" if ready else "not_ready", "checks": checks,
            "reason": "; ".join(reasons) or None, "disk": disk}
    return jsonify(body), 200 if ready else 503


def spool_disk(ctx: WebContext) -> DiskUsage:
    """The spool filesystem's use, as the running node measures it (or measured here)."""
    source = getattr(ctx.node, "disk_usage", None)
    return source() if callable(source) else measure(ctx.spool.root)


def _disk_check(ctx: WebContext, checks: dict[str, str], reasons: list[str]
                ) -> dict[str, float | int] | None:
    high = ctx.settings.storage.high_watermark_pct
    try:
        usage = spool_disk(ctx)
    except OSError:
        checks["disk"] = "unknown"
        reasons.append("spool disk use cannot be measured")
        return None
    # the running node's spool decides, with the hysteresis C-STORE uses (refusing from the
    # high watermark until below the low one); without a node, the high watermark alone
    watermarks = getattr(getattr(ctx.node, "spool", None), "watermarks", None)
    full = watermarks.update(usage.used_pct) if watermarks is not None else (
        usage.used_pct > high)
    checks["disk"] = "full" if full else "ok"
    if full:
        reasons.append(f"spool disk {usage.used_pct:.1f} % used: instances are refused "
                       f"above storage.high_watermark_pct {high:g} % until below "
                       f"storage.low_watermark_pct {ctx.settings.storage.low_watermark_pct:g} %")
    return {"total_bytes": usage.total_bytes, "used_bytes": usage.used_bytes,
            "free_bytes": usage.free_bytes, "used_ratio": round(usage.used_ratio, 6),
            "high_watermark_pct": high}
