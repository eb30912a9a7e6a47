"""Patient identifiers: read from the spool for authenticated dashboard pages only, and
scrubbed from free text (job errors, reasons) before any response.

The database holds no patient identifiers; they exist only in the received files. Free
text written by other parts of the node (an exception message recorded as a job error)
is scrubbed when stored (:class:`dicom_node.store.db.ScrubbedText`), but a row written by an
older version, or before the node had seen the header, could still quote one, so API
responses pass such text through :class:`Redactor`: the matching itself is
:mod:`dicom_node.phi`'s, with the study's own header values added.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom
from sqlalchemy import Connection, func, select

from dicom_node.dicomio import quiet, read_untrusted
from dicom_node.phi import PHI_KEYWORDS, PhiRegistry, redact, remember_phi
from dicom_node.spool import Spool
from dicom_node.store import db

logger = logging.getLogger(__name__)

_SHOWN = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "OtherPatientIDs", "StudyDate", "StudyDescription", "StudyID"]
_KEYWORDS = sorted(set(_SHOWN) | set(PHI_KEYWORDS) | {"OtherPatientIDsSequence"})


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


def read_header(spool: Spool, relpath: str) -> pydicom.Dataset | None:
    """The identifying attributes of a spooled instance (registered for scrubbing)."""
    try:
        ds = read_untrusted(spool.path(relpath), stop_before_pixels=True,
                            specific_tags=_KEYWORDS)
    except Exception as exc:  # noqa: BLE001 - a missing or odd file just shows no name
        logger.debug("patient header unreadable for %s: %s", relpath, type(exc).__name__)
        return None
    return remember_phi(ds)


def read_patient(spool: Spool, relpath: str) -> PatientInfo | None:
    ds = read_header(spool, relpath)
    if ds is None:
        return None

    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return "" if value is None else str(value)

    with quiet():  # values convert lazily: a malformed one must not warn with its value
        others = ds.get("OtherPatientIDs", []) or []
        others = [others] if isinstance(others, str) else list(others)
        return PatientInfo(name=text("PatientName"), patient_id=text("PatientID"),
                           birth_date=text("PatientBirthDate"), sex=text("PatientSex"),
                           accession=text("AccessionNumber"),
                           other_ids=tuple(map(str, others)), study_date=text("StudyDate"),
                           study_description=text("StudyDescription"),
                           study_id=text("StudyID"))


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
    """Scrubs free text of a study: every identifier the node has seen, plus this study's
    own header values (read once per study, even if the node has forgotten them)."""

    def __init__(self, conn: Connection, spool: Spool) -> None:
        self.conn = conn
        self.spool = spool
        self._read: set[str] = set()
        self._local = PhiRegistry()

    def prefetch(self, study_uids: Iterable[str]) -> None:
        missing = [u for u in set(study_uids) if u not in self._read]
        for path in first_instance_paths(self.conn, missing).values():
            ds = read_header(self.spool, path)
            if ds is not None:
                remember_phi(ds, self._local)
        self._read.update(missing)

    def __call__(self, study_uid: str, text: str | None) -> str | None:
        if not text:
            return text
        if study_uid not in self._read:
            self.prefetch([study_uid])
        return self._local.redact(redact(text) or "")
