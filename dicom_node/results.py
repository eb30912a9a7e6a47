"""What the node found, per study, for ``dicom-node results`` (text and ``--json``).

One document per call; its layout is a documented, stable interface for scripts
(``SCHEMA_VERSION``; fields are only ever added)::

    {"schema_version": 1,
     "studies": [{
        "study_uid": "1.2.3", "state": "done",
        "job_id": 7, "version": 1, "analysed_at": "2026-12-05T08:03:31Z",
        "images": 2, "positive": 3,
        "findings": [{"sop_instance_uid": "1.2.3.4", "label": "cardiomegaly",
                      "code": {"value": "287272002", "scheme": "SCT", "meaning": "..."},
                      "probability": 0.87, "threshold": 0.45, "positive": true,
                      "box": [x0, y0, x1, y1] or null,
                      "model": {"name": "cxr-demo-classifier", "version": "1.0.0",
                                "device_uid": "1.2...", "demo": true or false or null,
                                "display_name": "cxr-demo-classifier 1.0.0 (DEMO, ...)"}}],
        "results": [{"id": 1, "kind": "sr", "sop_instance_uid": "2.25...",
                     "series_uid": "2.25...", "job_id": 7, "created_at": "...Z",
                     "superseded": false,
                     "deliveries": [{"destination": "PACS@10.0.0.5:104", "state": "sent"}]}]
     }]}

``ood`` lists each gated model's out-of-distribution verdict per image of the current
result (``{"sop_instance_uid", "score", "threshold", "out_of_distribution", "model"}``);
``out_of_distribution: true`` means that model's findings were withheld for that image.
Findings are those of the study's current result (its latest finished job); ``results``
lists every result object of the study, earlier versions marked ``superseded``. ``demo`` is
recorded with each finding (rows from before it was: read from the bundles the configuration
names, null when that bundle is no longer there).
Times are UTC, ISO 8601. No patient data: UIDs, labels and figures only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from ai.types import ModelIdentity
from dicom_node.ood_records import verdicts_of
from dicom_node.store import db
from dicom_node.store.states import JobState

SCHEMA_VERSION = 1


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def demo_flags(bundle_dirs: list[Path]) -> dict[str, bool]:
    """Device UID -> whether that bundle is a demo bundle (``configs/metadata.json``, read
    as JSON: no model is loaded)."""
    flags: dict[str, bool] = {}
    for directory in bundle_dirs:
        try:
            doc = json.loads((directory / "configs" / "metadata.json").read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("device_uid"):
            flags[str(doc["device_uid"])] = bool(doc.get("demo"))
    return flags


def _finding(r: Any, demo: dict[str, bool]) -> dict[str, Any]:
    flag = r.model_demo if r.model_demo is not None else demo.get(r.device_uid)
    identity = ModelIdentity(name=r.model_name, version=r.model_version,
                             device_uid=r.device_uid, task="", demo=bool(flag))
    return {"sop_instance_uid": r.sop_instance_uid, "label": r.label,
            "code": {"value": r.code_value, "scheme": r.code_scheme,
                     "meaning": r.code_meaning},
            "probability": r.probability, "threshold": r.threshold,
            "positive": bool(r.positive),
            "box": [r.box_x0, r.box_y0, r.box_x1, r.box_y1] if r.box_x0 is not None else None,
            "model": {"name": r.model_name, "version": r.model_version,
                      "device_uid": r.device_uid, "demo": flag,
                      "display_name": identity.display_name}}


def _outputs(conn: Connection, study_uids: list[str]) -> dict[str, list[dict[str, Any]]]:
    o, d = db.outputs.c, db.deliveries.c
    rows = conn.execute(select(db.outputs).where(o.study_uid.in_(study_uids))
                        .order_by(o.id)).all()
    sent: dict[int, list[dict[str, str]]] = defaultdict(list)
    for r in conn.execute(select(d.output_id, d.destination, d.state)
                          .where(d.output_id.in_([x.id for x in rows])).order_by(d.id)):
        sent[r.output_id].append({"destination": r.destination, "state": r.state})
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r.study_uid].append({
            "id": r.id, "kind": r.kind, "sop_instance_uid": r.sop_instance_uid,
            "series_uid": r.series_uid, "job_id": r.job_id, "created_at": _iso(r.created_at),
            "superseded": r.superseded_at is not None, "deliveries": sent.get(r.id, [])})
    return out


def results_document(conn: Connection, *, study: str | None = None, limit: int | None = None,
                     demo: dict[str, bool] | None = None) -> dict[str, Any]:
    """Studies with a finished analysis, oldest first (``limit``: the newest N)."""
    j = db.jobs.c
    query = select(db.jobs, db.studies.c.state.label("study_state")).join(
        db.studies, db.studies.c.study_uid == j.study_uid).where(j.state == JobState.DONE)
    if study:
        query = query.where(j.study_uid == study)
    current: dict[str, Any] = {}
    for r in conn.execute(query.order_by(j.id)).all():
        current[r.study_uid] = r  # the latest finished job of each study wins
    jobs = sorted(current.values(), key=lambda r: (r.finished_at or 0, r.id))
    if limit is not None:
        jobs = jobs[-limit:] if limit > 0 else []
    f = db.findings.c
    findings: dict[int, list[Any]] = defaultdict(list)
    for r in conn.execute(select(db.findings).where(f.job_id.in_([x.id for x in jobs]))
                          .order_by(f.job_id, f.sop_instance_uid, f.id)).all():
        findings[r.job_id].append(r)
    outputs = _outputs(conn, [x.study_uid for x in jobs])
    demo = demo or {}
    studies = []
    for job in jobs:
        items = [_finding(r, demo) for r in findings[job.id]]
        ood = verdicts_of(conn, [job.id])
        # an image whose findings every model withheld has no finding row, only verdicts
        analysed = {x["sop_instance_uid"] for x in items} | {v["sop_instance_uid"] for v in ood}
        studies.append({
            "study_uid": job.study_uid, "state": job.study_state, "job_id": job.id,
            "version": job.version, "analysed_at": _iso(job.finished_at),
            "images": len(analysed), "positive": sum(x["positive"] for x in items),
            "findings": items, "results": outputs.get(job.study_uid, []), "ood": ood})
    return {"schema_version": SCHEMA_VERSION, "studies": studies}
