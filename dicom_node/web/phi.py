"""Patient identifiers: read from the spool for authenticated dashboard pages only, and
scrubbed from free text (job errors, reasons) before any response.

The database holds no patient identifiers; they exist only in the received files. Free
text written by other parts of the node (an exception message recorded as a job error)
could still quote one, so API responses pass such text through :class:`Redactor`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom
from sqlalchemy import Connection, func, select

from dicom_node import db
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
             "OtherPatientIDs", "StudyDate", "StudyDescription", "StudyID"]
REDACTED = "[redacted]"


@dataclass(frozen=True)
class PatientInfo:
    name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    accession: str = ""
    other_ids: tuple[str, ...] = ()
    study_date: str = ""
    study_description: str = ""
    study_id: str = ""

    def identifiers(self) -> list[str]:
        """Every string that must not leave through the API or a log."""
        values = [self.name, self.patient_id, self.birth_date, self.accession, self.study_id,
                  *self.other_ids]
        values += [part for part in re.split(r"[\^= ]+", self.name) if len(part) >= 3]
        return sorted({v.strip() for v in values if len(v.strip()) >= 2}, key=len, reverse=True)


def read_patient(spool: Spool, relpath: str) -> PatientInfo | None:
    try:
        ds = pydicom.dcmread(spool.path(relpath), stop_before_pixels=True,
                             specific_tags=_KEYWORDS)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a missing or odd file just shows no name
        logger.debug("patient header unreadable for %s: %s", relpath, type(exc).__name__)
        return None

    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return "" if value is None else str(value)

    others = ds.get("OtherPatientIDs", []) or []
    others = [others] if isinstance(others, str) else list(others)
    return PatientInfo(name=text("PatientName"), patient_id=text("PatientID"),
                       birth_date=text("PatientBirthDate"), sex=text("PatientSex"),
                       accession=text("AccessionNumber"), other_ids=tuple(map(str, others)),
                       study_date=text("StudyDate"),
                       study_description=text("StudyDescription"), study_id=text("StudyID"))


def first_instance_paths(conn: Connection, study_uids: Iterable[str]) -> dict[str, str]:
    """Study UID -> spool path of its first received instance."""
    uids = list(set(study_uids))
    if not uids:
        return {}
    first = (select(db.instances.c.study_uid, func.min(db.instances.c.id).label("id"))
             .where(db.instances.c.study_uid.in_(uids)).group_by(db.instances.c.study_uid)
             .subquery())
    rows = conn.execute(select(first.c.study_uid, db.instances.c.path)
                        .join(db.instances, db.instances.c.id == first.c.id)).all()
    return {r.study_uid: r.path for r in rows}


class Redactor:
    """Scrubs a study's patient identifiers from free text; reads each header once."""

    def __init__(self, conn: Connection, spool: Spool) -> None:
        self.conn = conn
        self.spool = spool
        self._ids: dict[str, list[str]] = {}

    def prefetch(self, study_uids: Iterable[str]) -> None:
        missing = [u for u in set(study_uids) if u not in self._ids]
        for uid, path in first_instance_paths(self.conn, missing).items():
            info = read_patient(self.spool, path)
            self._ids[uid] = info.identifiers() if info else []
        for uid in missing:
            self._ids.setdefault(uid, [])

    def __call__(self, study_uid: str, text: str | None) -> str | None:
        if not text:
            return text
        if study_uid not in self._ids:
            self.prefetch([study_uid])
        for value in self._ids[study_uid]:
            text = re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)
        return text
