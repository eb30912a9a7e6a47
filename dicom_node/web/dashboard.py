"""The dashboard: server-rendered pages for PACS engineers and quality officers.

Every page needs the login session (or a bearer token). Studies are addressed by the
internal id of one of their instances and images by internal ids, so no UID or patient
identifier ever sits in a URL; patient identifiers appear only inside these pages.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask.typing import ResponseReturnValue
from pydicom.uid import UID
from sqlalchemy import Connection, func, select

from dicom_node.store import db
from dicom_node.store.states import DeliveryState, InstanceState, JobState, RunState, StudyState
from dicom_node.web import actions, images, plots, queries
from dicom_node.web import evaluation_queries as eq
from dicom_node.web.api_evaluations import call_service, require_service
from dicom_node.web.api_meta import display_names, models_info
from dicom_node.web.api_studies import ID
from dicom_node.web.context import web_context
from dicom_node.web.errors import ApiError
from dicom_node.web.phi import PatientInfo, Redactor, first_instance_paths, read_patient
from dicom_node.web.validation import (
    check_name,
    enum_arg,
    job_arg,
    name_arg,
    page_args,
    query_params,
    time_range,
)

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")
PAGE_SIZE = 25
FILTERS = ("state", "modality", "received_from", "received_to")


def _patients(conn: Connection, study_uids: list[str]) -> dict[str, PatientInfo | None]:
    spool = web_context().spool
    return {uid: read_patient(spool, path)
            for uid, path in first_instance_paths(conn, study_uids).items()}


DELIVERED = (DeliveryState.SENT, DeliveryState.COMMITTED)


def _throughput(conn: Connection, since: float) -> dict[str, int]:
    i, j, d, s = db.instances.c, db.jobs.c, db.deliveries.c, db.studies.c
    return {
        "received": queries.count(conn, db.instances, i.received_at >= since),
        "analysed": queries.count(conn, db.jobs, j.state == JobState.DONE, j.finished_at >= since),
        "failed": queries.count(conn, db.jobs, j.state == JobState.FAILED, j.finished_at >= since),
        "ignored": queries.count(conn, db.studies, s.state == StudyState.IGNORED,
                                 s.updated_at >= since),
        "sent": queries.count(conn, db.deliveries, d.state.in_(DELIVERED), d.sent_at >= since),
    }


@bp.get("/")
@query_params()
def overview() -> ResponseReturnValue:
    ctx = web_context()
    now = time.time()
    j, d, s = db.jobs.c, db.deliveries.c, db.studies.c
    with db.reading(ctx.engine) as conn:
        stats = {"hour": _throughput(conn, now - 3600), "day": _throughput(conn, now - 86400)}
        queue = {"receiving": queries.count(conn, db.studies, s.state == StudyState.RECEIVING),
                 "queued": queries.count(conn, db.jobs, j.state == JobState.QUEUED),
                 "running": queries.count(conn, db.jobs, j.state == JobState.RUNNING),
                 "to_send": queries.count(conn, db.deliveries,
                                          d.state.in_(queries.DELIVERY_OPEN))}
        dead = {"deliveries": queries.count(conn, db.deliveries, d.state == DeliveryState.DEAD),
                "not_accepted": queries.count(conn, db.deliveries,
                                              d.state == DeliveryState.NOT_ACCEPTED),
                "jobs": queries.count(conn, db.jobs, j.state == JobState.FAILED)}
        alerts, n_alerts = eq.list_alerts(conn, active=True, job=None, label=None, limit=20,
                                          offset=0)
        recent, _ = queries.list_studies(conn, queries.StudyFilter(), 10, 0)
        patients = _patients(conn, [x["study_uid"] for x in recent])
        latest_runs = [eq.run_dict(r) for r in eq.latest_succeeded_runs(conn)]
    return render_template("overview.html", stats=stats, queue=queue, dead=dead,
                           alerts=alerts, n_alerts=n_alerts, recent=recent, patients=patients,
                           models=models_info(ctx), latest_runs=latest_runs, page="overview")


@bp.get("/studies")
@query_params("limit", "offset", "state", "modality", "received_from", "received_to")
def studies() -> ResponseReturnValue:
    g.empty_means_absent = FILTERS  # the filter form sends its empty fields
    p = page_args(PAGE_SIZE)
    lo, hi = time_range("received_from", "received_to")
    modality = name_arg("modality", 16)
    f = queries.StudyFilter(state=enum_arg("state", queries.STUDY_STATES), received_from=lo,
                            received_to=hi, modality=modality.upper() if modality else None)
    with db.reading(web_context().engine) as conn:
        items, total = queries.list_studies(conn, f, p.limit, p.offset)
        patients = _patients(conn, [x["study_uid"] for x in items])
    args = {k: v for k, v in request.args.items() if k not in ("offset", "limit") and v}
    return render_template("studies.html", items=items, total=total, limit=p.limit,
                           offset=p.offset, patients=patients, args=args,
                           states=queries.STUDY_STATES, page="studies")


def _study_uid(key: int) -> str:
    with db.reading(web_context().engine) as conn:
        uid = queries.study_uid_for_key(conn, key)
    if uid is None:
        raise ApiError(404, "study not found")
    return uid


def _key_for(conn: Connection, study_uid: str) -> int | None:
    return conn.execute(select(func.min(db.instances.c.id))
                        .where(db.instances.c.study_uid == study_uid)).scalar_one_or_none()


@bp.get(f"/studies/<{ID}:study_key>")
@query_params()
def study(study_key: int) -> ResponseReturnValue:
    ctx = web_context()
    uid = _study_uid(study_key)
    with db.reading(ctx.engine) as conn:
        detail = queries.get_study(conn, uid, Redactor(conn, ctx.spool))
        patient = _patients(conn, [uid]).get(uid)
    assert detail is not None
    current = detail["current_job_id"]
    findings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in detail["findings"]:
        if f["job_id"] == current:
            findings[f["sop_instance_uid"]].append(f)
    withheld: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in detail["ood"]:
        if v["job_id"] == current and v["out_of_distribution"]:
            withheld[v["sop_instance_uid"]].append(v)
    current_outputs = [o for o in detail["outputs"] if o["job_id"] == current]
    overlays: dict[str, list[int]] = defaultdict(list)
    for output_id, source_uid in images.sc_sources(ctx, current_outputs).items():
        overlays[source_uid].append(output_id)
    shown = [i for i in detail["instance_list"]
             if i["state"] in (InstanceState.ANALYSED, InstanceState.SELECTED)
             or i["sop_instance_uid"] in findings]
    syntaxes = {d["transfer_syntax"] for o in detail["outputs"] for d in o["deliveries"]
                if d["transfer_syntax"]}
    return render_template("study.html", study=detail, key=study_key, patient=patient,
                           findings=findings, overlays=overlays, shown=shown,
                           withheld=withheld,
                           reanalysable=detail["state"] in actions.REANALYSABLE,
                           delivery_states=queries.DELIVERY_STATES,
                           syntax_names={u: UID(u).name for u in syntaxes},
                           model_names=display_names(ctx), page="studies")


@bp.post(f"/studies/<{ID}:study_key>/reanalyse")
@query_params()
def reanalyse(study_key: int) -> ResponseReturnValue:
    try:
        result = actions.reanalyse(web_context(), _study_uid(study_key))
        job = f" as job {result['job_id']}" if result["job_id"] else ""
        flash(f"Re-analysis requested{job}: {result['instances']} image(s) pending again.",
              "ok")
    except ApiError as exc:
        if exc.status == 404:
            raise
        flash(exc.message, "error")
    return redirect(url_for("dashboard.study", study_key=study_key))


@bp.post(f"/deliveries/<{ID}:delivery_id>/resubmit")
@query_params()
def resubmit(delivery_id: int) -> ResponseReturnValue:
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        study_uid = conn.execute(select(db.outputs.c.study_uid).join(
            db.deliveries, db.deliveries.c.output_id == db.outputs.c.id)
            .where(db.deliveries.c.id == delivery_id)).scalar_one_or_none()
        key = _key_for(conn, study_uid) if study_uid else None
    try:
        actions.resubmit_one(ctx, delivery_id, actor="dashboard")
        flash(f"Delivery {delivery_id} is queued again.", "ok")
    except ApiError as exc:
        if exc.status == 404:
            raise
        flash(exc.message, "error")
    if key is None:
        return redirect(url_for("dashboard.overview"))
    return redirect(url_for("dashboard.study", study_key=key))


def _png(path: Any) -> Response:
    return send_file(path, mimetype="image/png", max_age=0)


@bp.get(f"/instances/<{ID}:instance_id>/image.png")
@query_params()
def instance_image(instance_id: int) -> ResponseReturnValue:
    return _png(images.instance_thumbnail(web_context(), instance_id))


@bp.get(f"/outputs/<{ID}:output_id>/image.png")
@query_params()
def output_image(output_id: int) -> ResponseReturnValue:
    return _png(images.output_thumbnail(web_context(), output_id))


def _floors(job: str | None, label: str) -> dict[str, float | None]:
    config = web_context().settings.evaluation.job(job) if job else None
    floor = config.floors.get(label) if config else None
    return floor.model_dump() if floor else {}


def _runs(conn: Connection, job: str, state: str | None, limit: int) -> list[dict[str, Any]]:
    return eq.list_runs(conn, job=job, kind=None, state=state, started_from=None,
                        started_to=None, limit=limit, offset=0)[0]


@bp.get("/evaluation")
@query_params("job")
def evaluation() -> ResponseReturnValue:
    ctx = web_context()
    with db.reading(ctx.engine) as conn:
        jobs = eq.evaluation_jobs(conn, ctx.settings.evaluation.jobs, {})
        names = [j["job_name"] for j in jobs]
        asked = job_arg()
        job = asked if asked in names else (names[0] if names else None)
        runs: list[dict[str, Any]] = []
        succeeded: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        if job:
            runs = _runs(conn, job, None, 15)
            succeeded = _runs(conn, job, RunState.SUCCEEDED, 1)
            alerts = eq.list_alerts(conn, active=True, job=job, label=None, limit=50,
                                    offset=0)[0]
        latest = eq.get_run(conn, succeeded[0]["id"]) if succeeded else None
    # one trend plot per model and label (a classifier's and a detector's "nodule": two)
    history_series = sorted({(m["model_name"], m["label"]) for m in latest["metrics"]}
                            if latest else ())
    selected = next((j for j in jobs if j["job_name"] == job), None)
    can_trigger = ctx.evaluation_service() is not None and bool(selected
                                                                 and selected["configured"])
    return render_template("evaluation.html", jobs=jobs, job=job, selected=selected,
                           runs=runs, latest=latest, history_series=history_series,
                           alerts=alerts, can_trigger=can_trigger, page="evaluation")


@bp.post("/evaluation/runs")
@query_params()
def trigger_run() -> ResponseReturnValue:
    job = check_name(request.form.get("job"), "job", 64)
    try:
        run_id = call_service("evaluation job", require_service().trigger_run, job)
        flash(f"Evaluation run {run_id} of {job} started.", "ok")
    except ApiError as exc:
        flash(exc.message, "error")
    return redirect(url_for("dashboard.evaluation", job=job))


@bp.get("/evaluation/history.png")
@query_params("job", "label", "model")
def history_plot() -> ResponseReturnValue:
    """One label over time: of one model (``model``: its name; one line per version), or
    of every model that measured it (one line each, never one line across models)."""
    job = job_arg()
    label = name_arg("label", 64)
    if label is None:
        raise ApiError(400, "label: is required", code="invalid_parameter", field="label")
    model = name_arg("model", 128)
    with db.reading(web_context().engine) as conn:
        points = eq.label_history(conn, label, job=job, model=model, started_from=None,
                                  started_to=None, limit=200)
    png = plots.history_png(label, points, _floors(job, label))
    return Response(png, mimetype="image/png")


@bp.get(f"/evaluation/runs/<{ID}:run_id>/roc.png")
@query_params()
def roc_plot(run_id: int) -> ResponseReturnValue:
    with db.reading(web_context().engine) as conn:
        run = eq.get_run(conn, run_id)
    if run is None:
        raise ApiError(404, "evaluation run not found")
    return Response(plots.roc_png(run["metrics"]), mimetype="image/png")
