"""JSON API: evaluation runs, per-label figures and their history, alerts; triggering a
run and posting confirmed labels go to the evaluation service (503 when there is none)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import update

from dicom_node.evaluation.errors import EvaluationBusyError, UnknownJobError
from dicom_node.store import db
from dicom_node.web import evaluation_queries as eq
from dicom_node.web.api_studies import ID, page
from dicom_node.web.context import EvaluationService, web_context
from dicom_node.web.errors import ApiError, bad_request
from dicom_node.web.validation import (
    bool_arg,
    check_name,
    check_uid,
    enum_arg,
    int_arg,
    job_arg,
    json_body,
    page_args,
    query_params,
    reject_unknown,
    text_arg,
    time_range,
)

logger = logging.getLogger(__name__)

bp = Blueprint("api_evaluations", __name__, url_prefix="/api/v1/evaluations")
MAX_LABELS_PER_POST = 100


def require_service() -> EvaluationService:
    service = web_context().evaluation_service()
    if service is None:
        raise ApiError(503, "evaluation jobs are not running in this process",
                       code="evaluation_unavailable")
    return service


def call_service(what: str, fn: Any, *args: Any) -> Any:
    """Run a service call; its documented errors become 4xx with a short message."""
    try:
        return fn(*args)
    except UnknownJobError:
        raise ApiError(404, f"{what}: not configured") from None
    except EvaluationBusyError as exc:
        raise ApiError(409, f"{what}: already running (run {exc.run_id} is in progress)",
                       code="conflict") from None
    except ValueError as exc:  # ConfirmedLabelError names the argument and quotes the value
        message = re.sub(r"'[^']*'|\"[^\"]*\"", "<value>", str(exc))[:300]
        raise ApiError(400, f"{what}: {message}", code="rejected") from None


def _next_runs(service: EvaluationService | None) -> dict[str, float | None]:
    lister = getattr(service, "list_jobs", None)
    if lister is None:
        return {}
    return {j.name: j.next_run_at for j in lister()}


@bp.get("/jobs")
@query_params()
def jobs() -> ResponseReturnValue:
    ctx = web_context()
    next_run = _next_runs(ctx.evaluation_service())
    with db.reading(ctx.engine) as conn:
        return jsonify({"items": eq.evaluation_jobs(conn, ctx.settings.evaluation.jobs,
                                                    next_run)})


@bp.get("/runs")
@query_params("limit", "offset", "job", "kind", "state", "started_from", "started_to")
def list_runs() -> ResponseReturnValue:
    p = page_args()
    lo, hi = time_range("started_from", "started_to")
    job = job_arg()
    kind = enum_arg("kind", eq.RUN_KINDS)
    state = enum_arg("state", eq.RUN_STATES)
    with db.reading(web_context().engine) as conn:
        items, total = eq.list_runs(conn, job=job, kind=kind, state=state, started_from=lo,
                                    started_to=hi, limit=p.limit, offset=p.offset)
    return jsonify(page(items, total, p.limit, p.offset))


@bp.post("/runs")
@query_params()
def trigger_run() -> ResponseReturnValue:
    body = json_body(required=True)
    reject_unknown(body, ("job",))
    if "job" not in body:
        raise bad_request("job", "is required (the name of a configured evaluation job)")
    job = check_name(body["job"], "job", 64)
    run_id = call_service("evaluation job", require_service().trigger_run, job)
    logger.info("evaluation run %s of job %s triggered through the API", run_id, job)
    return jsonify({"run_id": run_id, "job": job}), 202


@bp.get(f"/runs/<{ID}:run_id>")
@query_params()
def get_run(run_id: int) -> ResponseReturnValue:
    with db.reading(web_context().engine) as conn:
        run = eq.get_run(conn, run_id)
    if run is None:
        raise ApiError(404, "evaluation run not found")
    return jsonify(run)


@bp.get("/labels/<label>/history")
@query_params("job", "model", "started_from", "started_to", "limit")
def label_history(label: str) -> ResponseReturnValue:
    check_name(label, "label", 64)
    lo, hi = time_range("started_from", "started_to")
    job = job_arg()
    model = text_arg("model")
    limit = int_arg("limit", 100, 1, 1000)
    assert limit is not None
    with db.reading(web_context().engine) as conn:
        points = eq.label_history(conn, label, job=job, model=model, started_from=lo,
                                  started_to=hi, limit=limit)
    return jsonify({"label": label, "items": points})


@bp.get("/alerts")
@query_params("limit", "offset", "active", "job", "label")
def list_alerts() -> ResponseReturnValue:
    p = page_args()
    active = bool_arg("active")
    job = job_arg()
    label = text_arg("label", 64)
    with db.reading(web_context().engine) as conn:
        items, total = eq.list_alerts(conn, active=active, job=job, label=label,
                                      limit=p.limit, offset=p.offset)
    return jsonify(page(items, total, p.limit, p.offset))


@bp.post(f"/alerts/<{ID}:alert_id>/acknowledge")
@query_params()
def acknowledge_alert(alert_id: int) -> ResponseReturnValue:
    reject_unknown(json_body(required=False), ())
    a = db.evaluation_alerts.c
    with web_context().engine.begin() as conn:
        res = conn.execute(update(db.evaluation_alerts).where(a.id == alert_id)
                           .where(a.acknowledged_at.is_(None)).values(acknowledged_at=time.time()))
        if res.rowcount == 0:
            exists = conn.execute(db.evaluation_alerts.select().where(a.id == alert_id)).first()
            if exists is None:
                raise ApiError(404, "alert not found")
    logger.info("evaluation alert %d acknowledged", alert_id)
    return jsonify({"id": alert_id, "acknowledged": True})


@bp.post("/confirmed-labels")
@query_params()
def post_confirmed_labels() -> ResponseReturnValue:
    body = json_body(required=True)
    reject_unknown(body, ("key_kind", "key_uid", "labels"))
    if body.get("key_kind") not in ("study", "sop"):
        raise bad_request("key_kind", "must be study or sop")
    key_uid = check_uid(body.get("key_uid"), "key_uid")
    labels = body.get("labels")
    if not isinstance(labels, dict) or not 0 < len(labels) <= MAX_LABELS_PER_POST:
        raise bad_request("labels", f"must be an object of 1-{MAX_LABELS_PER_POST} "
                          "label names mapped to 0 or 1")
    for name, value in labels.items():
        check_name(name, "labels", 64)
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
            raise bad_request("labels", "every value must be 0 (absent) or 1 (present)")
    stored = call_service("confirmed labels", require_service().post_confirmed_labels, body["key_kind"],
                   key_uid, dict(labels))
    return jsonify({"stored": stored, "key_kind": body["key_kind"], "key_uid": key_uid}), 201
