"""Ingest of one received instance: dedupe, durable write, DB row, then a status.

Called from the C-STORE handler; never decodes pixel data and never runs inference.
Duplicate policy (documented in README):

* same SOP Instance UID, identical bytes: acknowledged, nothing stored again, no new analysis;
* same SOP Instance UID, different bytes: acknowledged (so the sender does not retry forever),
  the new bytes are quarantined with reason ``conflicting duplicate``; the first version stays
  the analysed one, so one input never yields two result sets.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass

import pydicom
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from dicom_node import db
from dicom_node.dicomio import quiet, read_untrusted
from dicom_node.errors import InvalidInstanceError, SpoolError, SpoolFullError
from dicom_node.spool import Spool, StoredFile
from dicom_node.studies import touch_study

logger = logging.getLogger(__name__)

_UID_CHARS = set("0123456789.")


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses the node uses (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and set(text) <= _UID_CHARS and not text.startswith(".")


@dataclass(frozen=True)
class Received:
    """One C-STORE request as the network layer hands it over (no decoding done)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    file_meta: pydicom.dataset.FileMetaDataset
    dataset_bytes: bytes
    calling_ae: str


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str | None
    modality: str | None


def encode_part10(rec: Received) -> list[bytes]:
    """Preamble + file meta + the dataset bytes exactly as received."""
    meta = io.BytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, rec.file_meta, enforce_standard=True)
    return [meta.getvalue(), rec.dataset_bytes]


def read_header(path: str) -> Header:
    """Read the few header values the node needs; raise InvalidInstanceError if unusable."""
    try:
        with quiet():
            ds = read_untrusted(path, stop_before_pixels=True)
            study = ds.get("StudyInstanceUID")
            series = ds.get("SeriesInstanceUID")
            modality = ds.get("Modality")
            sop = ds.get("SOPInstanceUID")
            meta_sop = ds.file_meta.get("MediaStorageSOPInstanceUID", sop)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is a reason
        raise InvalidInstanceError(f"header unreadable: {type(exc).__name__}") from exc
    if not valid_uid(study):
        raise InvalidInstanceError("StudyInstanceUID missing or invalid")
    if sop is not None and str(sop) != str(meta_sop):
        raise InvalidInstanceError("SOPInstanceUID differs from the C-STORE request")
    return Header(str(study), str(series) if valid_uid(series) else None,
                  str(modality)[:16] if modality else None)


class Ingestor:
    """Turns received C-STOREs into spool files and DB rows, returning the status to send."""

    def __init__(self, engine: Engine, spool: Spool, *, max_instance_bytes: int) -> None:
        self.engine = engine
        self.spool = spool
        self.max_instance_bytes = max_instance_bytes
        self._locks = [threading.Lock() for _ in range(64)]

    def ingest(self, rec: Received) -> StoreStatus:
        size = len(rec.dataset_bytes)
        if size > self.max_instance_bytes:
            logger.warning("instance %s refused: %d B over the limit", rec.sop_instance_uid, size)
            return StoreStatus.OUT_OF_RESOURCES
        if not valid_uid(rec.sop_instance_uid) or not valid_uid(rec.sop_class_uid):
            # raw body only: a file meta would have to repeat the invalid UID
            return self._quarantine(rec, "invalid SOP Instance or Class UID",
                                    StoreStatus.CANNOT_UNDERSTAND, [rec.dataset_bytes])
        lock = self._locks[hash(rec.sop_instance_uid) % len(self._locks)]
        try:
            with lock:
                return self._ingest_locked(rec)
        except SpoolFullError as exc:
            logger.error("spool full, refusing %s: %s", rec.sop_instance_uid, exc)
            return StoreStatus.OUT_OF_RESOURCES
        except SpoolError as exc:
            logger.error("spool error for %s: %s", rec.sop_instance_uid, exc)
            return StoreStatus.OUT_OF_RESOURCES

    def _ingest_locked(self, rec: Received) -> StoreStatus:
        chunks = encode_part10(rec)
        with self.engine.connect() as conn:
            existing = conn.execute(
                select(db.instances.c.sha256).where(
                    db.instances.c.sop_instance_uid == rec.sop_instance_uid)
            ).first()
        if existing is not None:
            digest = hashlib.sha256(b"".join(chunks)).hexdigest()
            if digest == existing.sha256:
                logger.info("duplicate %s with identical bytes: acknowledged", rec.sop_instance_uid)
                return StoreStatus.SUCCESS
            return self._quarantine(rec, "conflicting duplicate: same SOP Instance UID, "
                                    "different bytes", StoreStatus.SUCCESS, chunks)
        stored = self.spool.store(rec.sop_instance_uid, chunks, sum(map(len, chunks)))
        try:
            header = read_header(str(self.spool.path(stored.relpath)))
        except InvalidInstanceError as exc:
            self.spool.path(stored.relpath).unlink(missing_ok=True)
            return self._quarantine(rec, str(exc), StoreStatus.CANNOT_UNDERSTAND, chunks)
        self._commit(rec, stored, header)
        return StoreStatus.SUCCESS

    def _commit(self, rec: Received, stored: StoredFile, header: Header) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            try:
                conn.execute(insert(db.instances).values(
                    sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                    study_uid=header.study_uid, series_uid=header.series_uid,
                    transfer_syntax=rec.transfer_syntax, modality=header.modality,
                    path=stored.relpath, size=stored.size, sha256=stored.sha256,
                    calling_ae=rec.calling_ae, received_at=now, analysis_state="pending"))
            except IntegrityError as exc:  # only possible with several node processes
                raise SpoolError("concurrent insert of the same SOP Instance UID") from exc
            touch_study(conn, header.study_uid, now)
        logger.info("stored %s in study %s (%d B)", rec.sop_instance_uid, header.study_uid,
                    stored.size)

    def _quarantine(self, rec: Received, reason: str, status: StoreStatus,
                    chunks: list[bytes] | None = None) -> StoreStatus:
        chunks = chunks if chunks is not None else encode_part10(rec)
        try:
            stored = self.spool.quarantine(chunks, sum(map(len, chunks)))
        except SpoolError as exc:
            logger.error("cannot quarantine input: %s", exc)
            return StoreStatus.OUT_OF_RESOURCES
        with self.engine.begin() as conn:
            conn.execute(insert(db.quarantine).values(
                sop_instance_uid=rec.sop_instance_uid[:200], path=stored.relpath,
                size=stored.size, sha256=stored.sha256, calling_ae=rec.calling_ae,
                received_at=time.time(), reason=reason))
        logger.warning("quarantined input (%s): %s", stored.relpath, reason)
        return status
