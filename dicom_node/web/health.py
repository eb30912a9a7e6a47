"""Liveness and readiness, without authentication (for load balancers and systemd).

``/readyz`` is 200 only when the DICOM listener is up, the model is loaded and the
database answers; otherwise 503 with the reasons (no identifiers, no stack traces).
"""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.web.context import web_context
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
        listening = node.server is not None and not node.stop_event.is_set()
        checks["listener"] = "up" if listening else "down"
        if not listening:
            reasons.append("DICOM listener is not running")
        if node.analyzer is not None:
            checks["model"] = "loaded"
        elif node.model_error:
            checks["model"] = "failed"
            reasons.append("model could not be loaded (see the node log)")
        else:
            checks["model"] = "loading"
            reasons.append("model is loading")
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "up"
    except SQLAlchemyError:
        checks["database"] = "down"
        reasons.append("database does not answer")
    ready = not reasons
    body = {"status": "ready" if ready else "not_ready", "checks": checks,
            "reason": "; ".join(reasons) or None}
    return jsonify(body), 200 if ready else 503
