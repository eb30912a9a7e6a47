"""Read-side queries for studies, instances, jobs, findings, outputs and deliveries.

Shared by the JSON API and the dashboard. Rows become plain dicts with ISO 8601 UTC
times; free text passes through the :class:`~dicom_node.web.phi.Redactor`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, case, exists, func, select

from ai.types import ModelIdentity
from dicom_node.ood_records import verdicts_of
from dicom_node.store import db
from dicom_node.store.states import DeliveryState, InstanceState, JobState, StudyState
from dicom_node.web.phi import Redactor

STUDY_STATES = tuple(s.value for s in StudyState)
JOB_STATES = tuple(s.value for s in JobState)
DELIVERY_STATES = tuple(s.value for s in DeliveryState)
# not yet at an end: the sender still has work to do
DELIVERY_OPEN = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.RETRYING)
INSTANCE_STATES = tuple(s.value for s in InstanceState)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class StudyFilter:
    state: str | None = None
    received_from: float | None = None
    received_to: float | None = None
    modality: str | None = None


def _study_conditions(f: StudyFilter) -> list[Any]:
    s = db.studies.c
    cond: list[Any] = []
    if f.state:
        cond.append(s.state == f.state)
    if f.received_from is not None:
        cond.append(s.last_received_at >= f.received_from)
    if f.received_to is not None:
        cond.append(s.first_received_at <= f.received_to)
    if f.modality:
        cond.append(exists().where(and_(db.instances.c.study_uid == s.study_uid,
                                        db.instances.c.modality == f.modality)))
    return cond


def list_studies(conn: Connection, f: StudyFilter, limit: int, offset: int
                 ) -> tuple[list[dict[str, Any]], int]:
    cond = _study_conditions(f)
    total = conn.execute(select(func.count()).select_from(db.studies).where(*cond)).scalar_one()
    rows = conn.execute(select(db.studies).where(*cond)
                        .order_by(db.studies.c.last_received_at.desc(), db.studies.c.study_uid)
                        .limit(limit).offset(offset)).all()
    return summarise_studies(conn, rows), int(total)


def summarise_studies(conn: Connection, rows: list[Any]) -> list[dict[str, Any]]:
    uids = [r.study_uid for r in rows]
    inst = _instance_stats(conn, uids)
    deliveries = _delivery_counts(conn, uids)
    latest = _latest_jobs(conn, uids)
    positives = _positive_counts(conn, [j["id"] for j in latest.values()])
    out = []
    for r in rows:
        job = latest.get(r.study_uid)
        dcounts = deliveries.get(r.study_uid, {})
        out.append({
            "study_uid": r.study_uid,
            "key": inst.get(r.study_uid, {}).get("first_id"),
            "state": r.state,
            "status": derive_status(r.state, dcounts),
            "reason": r.reason,
            "first_received_at": iso(r.first_received_at),
            "last_received_at": iso(r.last_received_at),
            "updated_at": iso(r.updated_at),
            "instances": inst.get(r.study_uid, {}).get("count", 0),
            "modalities": inst.get(r.study_uid, {}).get("modalities", []),
            "latest_job": job,
            "positive_findings": positives.get(job["id"], 0) if job else 0,
            "deliveries": {s: dcounts.get(s, 0) for s in DELIVERY_STATES},
        })
    return out


def derive_status(state: str, deliveries: dict[str, int]) -> str:
    """One word for people: received, queued, analysing, ignored, failed, dead_letter,
    sending, sent (stored, or committed), not_accepted (no destination took any result
    object), or analysed (done with no destination configured)."""
    if state != StudyState.DONE:
        return {StudyState.RECEIVING.value: "received"}.get(state, state)
    if deliveries.get(DeliveryState.DEAD):
        return "dead_letter"
    if any(deliveries.get(s) for s in DELIVERY_OPEN):
        return "sending"
    if deliveries.get(DeliveryState.SENT) or deliveries.get(DeliveryState.COMMITTED):
        return "sent"
    return "not_accepted" if deliveries.get(DeliveryState.NOT_ACCEPTED) else "analysed"


def _instance_stats(conn: Connection, uids: list[str]) -> dict[str, dict[str, Any]]:
    if not uids:
        return {}
    i = db.instances.c
    rows = conn.execute(select(i.study_uid, i.modality, func.count().label("n"),
                               func.min(i.id).label("first_id"))
                        .where(i.study_uid.in_(uids)).group_by(i.study_uid, i.modality)).all()
    stats: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = stats.setdefault(r.study_uid, {"count": 0, "modalities": [], "first_id": r.first_id})
        s["count"] += r.n
        s["first_id"] = min(s["first_id"], r.first_id)
        if r.modality and r.modality not in s["modalities"]:
            s["modalities"].append(r.modality)
    return stats


def _delivery_counts(conn: Connection, uids: list[str]) -> dict[str, dict[str, int]]:
    if not uids:
        return {}
    o, d = db.outputs.c, db.deliveries.c
    rows = conn.execute(select(o.study_uid, d.state, func.count().label("n"))
                        .join(db.outputs, o.id == d.output_id)
                        .where(o.study_uid.in_(uids)).group_by(o.study_uid, d.state)).all()
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in rows:
        out[r.study_uid][r.state] = int(r.n)
    return out


def _latest_jobs(conn: Connection, uids: list[str]) -> dict[str, dict[str, Any]]:
    if not uids:
        return {}
    j = db.jobs.c
    newest = (select(func.max(j.id)).where(j.study_uid.in_(uids)).group_by(j.study_uid)
              .scalar_subquery())
    rows = conn.execute(select(j.id, j.study_uid, j.state).where(j.id.in_(newest))).all()
    return {r.study_uid: {"id": r.id, "state": r.state} for r in rows}


def _positive_counts(conn: Connection, job_ids: list[int]) -> dict[int, int]:
    if not job_ids:
        return {}
    f = db.findings.c
    rows = conn.execute(select(f.job_id, func.count().label("n")).where(f.job_id.in_(job_ids))
                        .where(f.positive.is_(True)).group_by(f.job_id)).all()
    return {r.job_id: int(r.n) for r in rows}


def job_dict(r: Any, redact: Redactor) -> dict[str, Any]:
    return {"id": r.id, "study_uid": r.study_uid, "state": r.state, "attempts": r.attempts,
            "created_at": iso(r.created_at), "started_at": iso(r.started_at),
            "finished_at": iso(r.finished_at), "duration_s": r.duration_s,
            "error": redact(r.study_uid, r.error)}


def study_uid_for_key(conn: Connection, key: int) -> str | None:
    """The dashboard addresses a study by the internal id of one of its instances."""
    return conn.execute(select(db.instances.c.study_uid)
                        .where(db.instances.c.id == key)).scalar_one_or_none()


def get_study(conn: Connection, study_uid: str, redact: Redactor) -> dict[str, Any] | None:
    row = conn.execute(select(db.studies).where(db.studies.c.study_uid == study_uid)).first()
    if row is None:
        return None
    study = summarise_studies(conn, [row])[0]
    study["reason"] = redact(study_uid, study["reason"])
    i = db.instances.c
    study["instance_list"] = [{
        "id": r.id, "sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid,
        "series_uid": r.series_uid, "modality": r.modality,
        "transfer_syntax": r.transfer_syntax, "size": r.size, "received_at": iso(r.received_at),
        "state": r.analysis_state, "reason": redact(study_uid, r.reason), "job_id": r.job_id,
    } for r in conn.execute(select(db.instances).where(i.study_uid == study_uid)
                            .order_by(i.id)).all()]
    jobs = conn.execute(select(db.jobs).where(db.jobs.c.study_uid == study_uid)
                        .order_by(db.jobs.c.id)).all()
    study["jobs"] = [job_dict(j, redact) for j in jobs]
    done = [j.id for j in jobs if j.state == JobState.DONE]
    study["current_job_id"] = done[-1] if done else None
    study["findings"] = _findings(conn, [j.id for j in jobs])
    study["ood"] = verdicts_of(conn, [j.id for j in jobs])
    study["outputs"] = _outputs(conn, study_uid)
    per_dest: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(DELIVERY_STATES, 0))
    for out in study["outputs"]:
        for d in out["deliveries"]:
            per_dest[d["destination"]][d["state"]] += 1
    study["deliveries_by_destination"] = dict(per_dest)
    return study


def _findings(conn: Connection, job_ids: list[int]) -> list[dict[str, Any]]:
    if not job_ids:
        return []
    f = db.findings.c
    rows = conn.execute(select(db.findings).where(f.job_id.in_(job_ids))
                        .order_by(f.job_id, f.sop_instance_uid, f.id)).all()
    return [{
        "id": r.id, "job_id": r.job_id, "sop_instance_uid": r.sop_instance_uid,
        "label": r.label, "code": {"value": r.code_value, "scheme": r.code_scheme,
                                   "meaning": r.code_meaning},
        "probability": r.probability, "threshold": r.threshold, "positive": bool(r.positive),
        "box": ([r.box_x0, r.box_y0, r.box_x1, r.box_y1] if r.box_x0 is not None else None),
        "model": _model(r),
    } for r in rows]


def _model(r: Any) -> dict[str, Any]:
    """The model of a finding; ``demo`` and ``display_name`` (as the SR names it) when the
    worker recorded whether it was a demo bundle (older rows: None)."""
    demo = None if r.model_demo is None else bool(r.model_demo)
    name = None if demo is None else ModelIdentity(
        name=r.model_name, version=r.model_version, device_uid=r.device_uid,
        task="", demo=demo).display_name
    return {"name": r.model_name, "version": r.model_version, "device_uid": r.device_uid,
            "demo": demo, "display_name": name}


def delivery_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "output_id": r.output_id, "destination": r.destination,
            "state": r.state, "attempts": r.attempts, "last_status": r.last_status,
            "last_error": r.last_error, "next_attempt_at": iso(r.next_attempt_at),
            "created_at": iso(r.created_at), "sent_at": iso(r.sent_at),
            "transfer_syntax": r.transfer_syntax,
            "commit_transaction_uid": r.commit_transaction_uid,
            "commit_requested_at": iso(r.commit_requested_at),
            "committed_at": iso(r.committed_at)}


def _outputs(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    o = db.outputs.c
    outs = conn.execute(select(db.outputs).where(o.study_uid == study_uid)
                        .order_by(o.job_id, o.id)).all()
    dels = conn.execute(select(db.deliveries).where(db.deliveries.c.output_id.in_(
        [x.id for x in outs])).order_by(db.deliveries.c.id)).all() if outs else []
    by_output: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for d in dels:
        by_output[d.output_id].append(delivery_dict(d))
    return [{"id": x.id, "job_id": x.job_id, "kind": x.kind,
             "sop_instance_uid": x.sop_instance_uid, "sop_class_uid": x.sop_class_uid,
             "series_uid": x.series_uid, "created_at": iso(x.created_at),
             "deliveries": by_output.get(x.id, [])} for x in outs]


def list_jobs(conn: Connection, redact: Redactor, *, state: str | None,
              study_uid: str | None, created_from: float | None, created_to: float | None,
              limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    j = db.jobs.c
    cond: list[Any] = []
    if state:
        cond.append(j.state == state)
    if study_uid:
        cond.append(j.study_uid == study_uid)
    if created_from is not None:
        cond.append(j.created_at >= created_from)
    if created_to is not None:
        cond.append(j.created_at <= created_to)
    total = conn.execute(select(func.count()).select_from(db.jobs).where(*cond)).scalar_one()
    rows = conn.execute(select(db.jobs).where(*cond).order_by(j.id.desc())
                        .limit(limit).offset(offset)).all()
    redact.prefetch(r.study_uid for r in rows if r.error)
    return [job_dict(r, redact) for r in rows], int(total)


def get_job(conn: Connection, job_id: int, redact: Redactor) -> dict[str, Any] | None:
    row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
    if row is None:
        return None
    job = job_dict(row, redact)
    job["instances"] = [r.sop_instance_uid for r in conn.execute(
        select(db.instances.c.sop_instance_uid).where(db.instances.c.job_id == job_id)
        .order_by(db.instances.c.id)).all()]
    job["findings"] = _findings(conn, [job_id])
    job["ood"] = verdicts_of(conn, [job_id])
    return job


def list_deliveries(conn: Connection, *, state: str | None, destination: str | None,
                    study_uid: str | None, limit: int, offset: int
                    ) -> tuple[list[dict[str, Any]], int]:
    d, o = db.deliveries.c, db.outputs.c
    cond: list[Any] = []
    if state:
        cond.append(d.state == state)
    if destination:
        cond.append(d.destination == destination)
    if study_uid:
        cond.append(o.study_uid == study_uid)
    base = select(db.deliveries, o.kind, o.sop_instance_uid, o.study_uid).join(
        db.outputs, o.id == d.output_id).where(*cond)
    total = conn.execute(select(func.count()).select_from(base.subquery())).scalar_one()
    rows = conn.execute(base.order_by(d.id.desc()).limit(limit).offset(offset)).all()
    return [{**delivery_dict(r), "kind": r.kind, "sop_instance_uid": r.sop_instance_uid,
             "study_uid": r.study_uid} for r in rows], int(total)


def counts_by(conn: Connection, column: Any, *where: Any) -> dict[str, int]:
    rows = conn.execute(select(column, func.count()).where(*where).group_by(column)).all()
    return {str(k): int(n) for k, n in rows}


def count(conn: Connection, table: Any, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def duration_histogram(conn: Connection, bounds: tuple[float, ...]
                       ) -> tuple[list[int], int, float]:
    """Cumulative bucket counts of done jobs' durations, their count and sum."""
    j = db.jobs.c
    done = and_(j.state == JobState.DONE, j.duration_s.is_not(None))
    cols = [func.sum(case((j.duration_s <= b, 1), else_=0)) for b in bounds]
    row = conn.execute(select(*cols, func.count(), func.sum(j.duration_s)).where(done)).one()
    return [int(v or 0) for v in row[:-2]], int(row[-2] or 0), float(row[-1] or 0.0)
