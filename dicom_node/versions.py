"""Versions of a study's result: late images supersede the earlier result.

When images arrive for a study that already has a result (or was analysed at its maximum
wait), the next job analyses every analysable image of the study and produces version
``n + 1``: the same series per kind (series UIDs seeded by the study and the models), new
instances (instance UIDs seeded by the inputs and the models, so re-running the *same*
inputs re-creates the same objects), the earlier outputs marked ``superseded_at`` /
``superseded_by_job``, and the new SR naming the SR it replaces in its Predecessor
Documents Sequence (PS3.3 C.17.2). Findings stay per job, so the earlier ones remain as
history.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import Connection, select, update

from ai.types import ModelIdentity
from dicom_node.dicomio import referenced_sops
from dicom_node.outputs import OutputObject
from dicom_node.store import db

logger = logging.getLogger(__name__)


def _model_keys(models: Sequence[ModelIdentity]) -> list[str]:
    return sorted(f"{m.name}:{m.version}:{m.device_uid}" for m in models)


def uid_seed(sop_uids: Sequence[str], models: Sequence[ModelIdentity]) -> str:
    """Seed of the output *instance* UIDs: the analysed inputs and the models."""
    return "|".join(sorted(sop_uids) + _model_keys(models))


def series_seed(study_uid: str, models: Sequence[ModelIdentity]) -> str:
    """Seed of the output *series* UIDs: the study and the models, not the inputs."""
    return "|".join(["result-series", study_uid, *_model_keys(models)])


@dataclass(frozen=True)
class PriorOutput:
    """An output of an earlier job of the study that nothing has superseded yet."""

    id: int
    job_id: int
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str


def current_outputs(conn: Connection, study_uid: str, *, other_than_job: int
                    ) -> list[PriorOutput]:
    """The study's current result objects made by jobs other than ``other_than_job``."""
    o = db.outputs.c
    rows = conn.execute(select(o.id, o.job_id, o.kind, o.sop_instance_uid, o.sop_class_uid,
                               o.series_uid, o.study_uid)
                        .where(o.study_uid == study_uid).where(o.superseded_at.is_(None))
                        .where(o.job_id != other_than_job).order_by(o.id)).all()
    return [PriorOutput(*r) for r in rows]


def link_predecessors(objects: Iterable[OutputObject], prior: Sequence[PriorOutput]) -> int:
    """Name the prior SR(s) in each new SR's Predecessor Documents Sequence.

    A prior SR with the new SR's own UID (the same inputs analysed again) is the same
    document, not a predecessor. Returns how many references were added.
    """
    added = 0
    for obj in objects:
        if obj.kind != "sr":
            continue
        refs = [p for p in prior if p.kind == "sr" and p.sop_instance_uid != obj.sop_instance_uid]
        if refs:
            obj.dataset.PredecessorDocumentsSequence = _hierarchical_references(refs)
            added += len(refs)
    return added


def _hierarchical_references(refs: Sequence[PriorOutput]) -> list[Dataset]:
    """PS3.3 Table C.17-3 (Hierarchical SOP Instance Reference Macro): study > series > SOP."""
    studies: dict[str, dict[str, list[PriorOutput]]] = {}
    for ref in refs:
        studies.setdefault(ref.study_uid, {}).setdefault(ref.series_uid, []).append(ref)
    items = []
    for study_uid, series in studies.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = [_series_item(uid, members)
                                               for uid, members in series.items()]
        items.append(study_item)
    return items


def _series_item(series_uid: str, members: Sequence[PriorOutput]) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    item.ReferencedSOPSequence = referenced_sops(members)
    return item


def supersede(conn: Connection, job_id: int, prior: Sequence[PriorOutput],
              current_sop_uids: set[str], now: float) -> list[int]:
    """Job ``job_id``'s outputs (``current_sop_uids``) replace ``prior``.

    Prior objects the job re-created with the same UID (the same inputs analysed again)
    stay current, and are current again if an earlier version had superseded them. Returns
    the result versions superseded, for the record.
    """
    o = db.outputs.c
    conn.execute(update(db.outputs).where(o.sop_instance_uid.in_(current_sop_uids))
                 .where(o.superseded_at.is_not(None))
                 .values(superseded_at=None, superseded_by_job=None))
    replaced = [p for p in prior if p.sop_instance_uid not in current_sop_uids]
    if not replaced:
        return []
    conn.execute(update(db.outputs).where(o.id.in_([p.id for p in replaced]))
                 .where(o.superseded_at.is_(None))
                 .values(superseded_at=now, superseded_by_job=job_id))
    return sorted(set(conn.execute(
        select(db.jobs.c.version).where(db.jobs.c.id.in_({p.job_id for p in replaced}))
    ).scalars()))
