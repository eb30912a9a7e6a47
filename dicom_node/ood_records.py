"""The out-of-distribution verdicts of a job, in the database and out of it again.

The worker records every gated model's verdict per image (:data:`db.ood_verdicts`); the
API, the dashboard's study page, ``dicom-node results`` and ``/metrics`` read them here, so
all four say the same: ``out_of_distribution: true`` for a (model, image) pair means the
image was outside that model's validated input range and its findings were withheld.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from ai.types import ImageResult, ModelIdentity
from dicom_node.store import db


def record_verdicts(conn: Connection, job_id: int, results: Sequence[ImageResult]) -> None:
    """Replace the job's verdicts with those of ``results`` (inside the job's commit)."""
    conn.execute(delete(db.ood_verdicts).where(db.ood_verdicts.c.job_id == job_id))
    rows = [{"job_id": job_id, "sop_instance_uid": r.sop_instance_uid,
             "model_name": v.model.name, "model_version": v.model.version,
             "device_uid": v.model.device_uid, "model_demo": v.model.demo,
             "score": float(v.score), "threshold": float(v.threshold),
             "out_of_distribution": v.out_of_distribution}
            for r in results for v in r.ood]  # fmt: skip
    if rows:
        conn.execute(insert(db.ood_verdicts), rows)


def verdicts_of(conn: Connection, job_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The verdicts of ``job_ids`` as the API and ``dicom-node results`` show them."""
    if not job_ids:
        return []
    o = db.ood_verdicts.c
    rows = conn.execute(select(db.ood_verdicts).where(o.job_id.in_(list(job_ids)))
                        .order_by(o.job_id, o.sop_instance_uid, o.id)).all()
    return [{
        "job_id": r.job_id, "sop_instance_uid": r.sop_instance_uid,
        "score": r.score, "threshold": r.threshold,
        "out_of_distribution": bool(r.out_of_distribution),
        "model": {"name": r.model_name, "version": r.model_version, "device_uid": r.device_uid,
                  "demo": bool(r.model_demo),
                  "display_name": ModelIdentity(r.model_name, r.model_version, r.device_uid,
                                                "", demo=bool(r.model_demo)).display_name},
    } for r in rows]  # fmt: skip


def withheld_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """(model name, version) -> images whose findings that model withheld."""
    o = db.ood_verdicts.c
    rows = conn.execute(select(o.model_name, o.model_version, func.count())
                        .where(o.out_of_distribution.is_(True))
                        .group_by(o.model_name, o.model_version)).all()
    return {(r[0], r[1]): int(r[2]) for r in rows}
