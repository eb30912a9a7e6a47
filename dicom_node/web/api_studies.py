"""JSON API: studies (with instances, jobs, findings, outputs, deliveries), jobs, and
deliveries with their resubmit actions. Patient identifiers never appear here."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from dicom_node.store import db
from dicom_node.web import actions, queries
from dicom_node.web.context import web_context
from dicom_node.web.errors import ApiError, bad_request
from dicom_node.web.phi import Redactor
from dicom_node.web.validation import (
    check_uid,
    enum_arg,
    json_body,
    name_arg,
    page_args,
    query_params,
    reject_unknown,
    text_arg,
    time_range,
    uid_arg,
)

bp = Blueprint("api_studies", __name__, url_prefix="/api/v1")
ID = "int(min=1, max=2147483647)"  # database ids fit a 32-bit integer column everywhere


def page(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@bp.get("/studies")
@query_params("limit", "offset", "state", "modality", "received_from", "received_to")
def list_studies() -> ResponseReturnValue:
    p = page_args()
    lo, hi = time_range("received_from", "received_to")
    modality = name_arg("modality", 16)
    f = queries.StudyFilter(state=enum_arg("state", queries.STUDY_STATES), received_from=lo,
                            received_to=hi, modality=modality.upper() if modality else None)
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        items, total = queries.list_studies(conn, f, p.limit, p.offset)
        redact = Redactor(conn, ctx.spool)
        redact.prefetch(s["study_uid"] for s in items if s["reason"])
        for s in items:
            s["reason"] = redact(s["study_uid"], s["reason"])
    return jsonify(page(items, total, p.limit, p.offset))


@bp.get("/studies/<study_uid>")
@query_params()
def get_study(study_uid: str) -> ResponseReturnValue:
    check_uid(study_uid, "study_uid")
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        study = queries.get_study(conn, study_uid, Redactor(conn, ctx.spool))
    if study is None:
        raise ApiError(404, "study not found")
    return jsonify(study)


@bp.post("/studies/<study_uid>/reanalyse")
@query_params()
def reanalyse(study_uid: str) -> ResponseReturnValue:
    check_uid(study_uid, "study_uid")
    reject_unknown(json_body(required=False), ())
    result = actions.reanalyse(web_context(), study_uid)
    result["policy"] = ("same inputs and model(s) rebuild the same result objects (same "
                        "UIDs) and send nothing twice; a new model version gives new objects")
    return jsonify(result), 202


@bp.get("/jobs")
@query_params("limit", "offset", "state", "study_uid", "created_from", "created_to")
def list_jobs() -> ResponseReturnValue:
    p = page_args()
    lo, hi = time_range("created_from", "created_to")
    state = enum_arg("state", queries.JOB_STATES)
    study_uid = uid_arg("study_uid")
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        items, total = queries.list_jobs(conn, Redactor(conn, ctx.spool), state=state,
                                         study_uid=study_uid, created_from=lo, created_to=hi,
                                         limit=p.limit, offset=p.offset)
    return jsonify(page(items, total, p.limit, p.offset))


@bp.get(f"/jobs/<{ID}:job_id>")
@query_params()
def get_job(job_id: int) -> ResponseReturnValue:
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        job = queries.get_job(conn, job_id, Redactor(conn, ctx.spool))
    if job is None:
        raise ApiError(404, "job not found")
    return jsonify(job)


@bp.get("/deliveries")
@query_params("limit", "offset", "state", "destination", "study_uid")
def list_deliveries() -> ResponseReturnValue:
    p = page_args()
    state = enum_arg("state", queries.DELIVERY_STATES)
    destination = text_arg("destination")
    study_uid = uid_arg("study_uid")
    with db.reading(web_context().engine) as conn:
        items, total = queries.list_deliveries(conn, state=state, destination=destination,
                                               study_uid=study_uid, limit=p.limit,
                                               offset=p.offset)
    return jsonify(page(items, total, p.limit, p.offset))


@bp.post(f"/deliveries/<{ID}:delivery_id>/resubmit")
@query_params()
def resubmit_one(delivery_id: int) -> ResponseReturnValue:
    reject_unknown(json_body(required=False), ())
    return jsonify(actions.resubmit_one(web_context(), delivery_id))


@bp.post("/deliveries/resubmit")
@query_params()
def resubmit_dead() -> ResponseReturnValue:
    body = json_body(required=False)
    reject_unknown(body, ("destination",))
    destination = body.get("destination")
    if "destination" in body and (not isinstance(destination, str)
                                  or not 0 < len(destination) <= 128):
        raise bad_request("destination", "must be a destination name, AE@HOST:PORT")
    return jsonify(actions.resubmit_dead(web_context(), destination))
