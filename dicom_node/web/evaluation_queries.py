"""Read-side queries for evaluation runs, their per-label figures, history and alerts."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, func, select

from dicom_node.evaluation.settings import EvaluationJobSettings
from dicom_node.store import db
from dicom_node.store.states import RunState
from dicom_node.web.queries import iso

logger = logging.getLogger(__name__)

FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auroc")
RUN_STATES = tuple(s.value for s in RunState)
RUN_KINDS = ("reference", "confirmed")


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        logger.warning("unparsable JSON in an evaluation row; shown as null")
        return None


def figure(r: Any, name: str) -> dict[str, float | None]:
    return {"value": getattr(r, name), "ci_lower": getattr(r, f"{name}_lo"),
            "ci_upper": getattr(r, f"{name}_hi")}


def metric_dict(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "run_id": r.run_id, "model_name": r.model_name,
        "model_version": r.model_version, "label": r.label, "threshold": r.threshold,
        "n_pos": r.n_pos, "n_neg": r.n_neg, "tp": r.tp, "fp": r.fp, "tn": r.tn, "fn": r.fn,
    }
    out.update({name: figure(r, name) for name in FIGURES})
    out.update({"f1": r.f1, "ap50": r.ap50, "froc": _json(r.froc), "roc": _json(r.roc),
                "localisation": _json(getattr(r, "localisation", None))})
    return out


def run_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "job_name": r.job_name, "kind": r.kind, "trigger": r.trigger,
            "state": r.state, "scheduled_for": iso(r.scheduled_for),
            "started_at": iso(r.started_at), "finished_at": iso(r.finished_at),
            "error": r.error, "n_images": r.n_images, "models": _json(r.models),
            "alerts": r.alerts or 0, "summary": _json(getattr(r, "summary", None))}


def alert_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.run_id, "job_name": r.job_name,
            "model_name": r.model_name, "label": r.label, "metric": r.metric,
            "value": r.value, "floor": r.floor, "created_at": iso(r.created_at),
            "acknowledged_at": iso(r.acknowledged_at), "active": r.acknowledged_at is None}


def list_runs(conn: Connection, *, job: str | None, kind: str | None, state: str | None,
              started_from: float | None, started_to: float | None, limit: int, offset: int
              ) -> tuple[list[dict[str, Any]], int]:
    r = db.evaluation_runs.c
    cond: list[Any] = []
    if job:
        cond.append(r.job_name == job)
    if kind:
        cond.append(r.kind == kind)
    if state:
        cond.append(r.state == state)
    if started_from is not None:
        cond.append(r.started_at >= started_from)
    if started_to is not None:
        cond.append(r.started_at <= started_to)
    total = conn.execute(select(func.count()).select_from(db.evaluation_runs)
                         .where(*cond)).scalar_one()
    rows = conn.execute(select(db.evaluation_runs).where(*cond)
                        .order_by(r.started_at.desc(), r.id.desc())
                        .limit(limit).offset(offset)).all()
    return [run_dict(x) for x in rows], int(total)


def get_run(conn: Connection, run_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(db.evaluation_runs)
                       .where(db.evaluation_runs.c.id == run_id)).first()
    if row is None:
        return None
    run = run_dict(row)
    m = db.evaluation_metrics.c
    run["metrics"] = [metric_dict(x) for x in conn.execute(
        select(db.evaluation_metrics).where(m.run_id == run_id)
        .order_by(m.model_name, m.label)).all()]
    run["alert_list"] = [alert_dict(x) for x in conn.execute(
        select(db.evaluation_alerts).where(db.evaluation_alerts.c.run_id == run_id)
        .order_by(db.evaluation_alerts.c.id)).all()]
    return run


def label_history(conn: Connection, label: str, *, job: str | None, model: str | None,
                  started_from: float | None, started_to: float | None, limit: int
                  ) -> list[dict[str, Any]]:
    """One point per succeeded run that measured ``label``, oldest first."""
    r, m = db.evaluation_runs.c, db.evaluation_metrics.c
    query = (select(db.evaluation_metrics, r.job_name, r.kind, r.started_at, r.finished_at)
             .join(db.evaluation_runs, r.id == m.run_id)
             .where(m.label == label, r.state == RunState.SUCCEEDED))
    if job:
        query = query.where(r.job_name == job)
    if model:
        query = query.where(m.model_name == model)
    if started_from is not None:
        query = query.where(r.started_at >= started_from)
    if started_to is not None:
        query = query.where(r.started_at <= started_to)
    rows = conn.execute(query.order_by(r.started_at.desc(), m.id.desc()).limit(limit)).all()
    points = []
    for x in reversed(rows):
        point = metric_dict(x)
        point.pop("roc")
        point.pop("froc")
        point.update({"job_name": x.job_name, "kind": x.kind, "started_at": iso(x.started_at),
                      "finished_at": iso(x.finished_at)})
        points.append(point)
    return points


def list_alerts(conn: Connection, *, active: bool | None, job: str | None,
                label: str | None, limit: int, offset: int
                ) -> tuple[list[dict[str, Any]], int]:
    a = db.evaluation_alerts.c
    cond: list[Any] = []
    if active is True:
        cond.append(a.acknowledged_at.is_(None))
    elif active is False:
        cond.append(a.acknowledged_at.is_not(None))
    if job:
        cond.append(a.job_name == job)
    if label:
        cond.append(a.label == label)
    total = conn.execute(select(func.count()).select_from(db.evaluation_alerts)
                         .where(*cond)).scalar_one()
    rows = conn.execute(select(db.evaluation_alerts).where(*cond)
                        .order_by(a.created_at.desc(), a.id.desc())
                        .limit(limit).offset(offset)).all()
    return [alert_dict(x) for x in rows], int(total)


def evaluation_jobs(conn: Connection, configured: Sequence[EvaluationJobSettings],
                    next_run: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Configured jobs (with floors and schedule), then names that ran but are no longer
    configured; each with its run count, latest run and the id of a run in progress."""
    r = db.evaluation_runs.c
    latest_ids = select(func.max(r.id)).group_by(r.job_name).scalar_subquery()
    counts = dict(conn.execute(select(r.job_name, func.count()).group_by(r.job_name)).all())
    latest = {x.job_name: x for x in conn.execute(
        select(db.evaluation_runs).where(r.id.in_(latest_ids))).all()}
    running = dict(conn.execute(select(r.job_name, func.max(r.id))
                                .where(r.state == RunState.RUNNING).group_by(r.job_name)).all())
    out = []
    for job in configured:
        out.append({"job_name": job.name, "kind": job.kind, "configured": True,
                    "enabled": job.enabled,
                    "schedule": job.schedule.describe() if job.schedule else None,
                    "floors": {k: v.model_dump() for k, v in job.floors.items()},
                    "next_run_at": iso(next_run.get(job.name))})
    for name in sorted(set(latest) - {j.name for j in configured}):
        out.append({"job_name": name, "kind": latest[name].kind, "configured": False,
                    "enabled": False, "schedule": None, "floors": {}, "next_run_at": None})
    for item in out:
        name = item["job_name"]
        item["runs"] = int(counts.get(name, 0))
        item["last_run"] = run_dict(latest[name]) if name in latest else None
        item["running_run_id"] = running.get(name)
    return out


def latest_succeeded_runs(conn: Connection) -> list[Any]:
    """The newest succeeded run of each job (for /metrics and the overview)."""
    r = db.evaluation_runs.c
    latest = (select(func.max(r.id)).where(r.state == RunState.SUCCEEDED).group_by(r.job_name)
              .scalar_subquery())
    return list(conn.execute(select(db.evaluation_runs).where(r.id.in_(latest))
                             .order_by(r.job_name)).all())
