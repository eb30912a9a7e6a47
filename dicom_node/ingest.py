"""Ingest of one received instance: admission, bounded header read, dedupe, durable move,
DB row (with its audit event), then a status.

Called from the C-STORE handler; never decodes pixel data and never runs inference. The
data set arrives as a Part 10 file under the spool's ``tmp/`` (pynetdicom streams it there
as its fragments arrive, see :mod:`dicom_node.transport`), so accepting it is an fsync and
a rename; in-memory data sets (tools, tests) are written there first. Its header is parsed
once, from the first bytes captured in memory while the file was written (a
:class:`dicom_node.spool.Tap`, 64 kB; the file's own bounded prefix only when the header is
longer, or for a Deflated data set), before it moves into the spool; the selection
attributes of that parse go on the instance row, so assembly reads no file. The same tap
gives the file's sha256, so the file is never read back.

The row goes through the group commit (:mod:`dicom_node.store.group_commit`): the rows of
all associations are written by one thread, one transaction (one fsync) per batch, and each
C-STORE is answered once ITS batch is durable. The duplicate check is the insert itself
(``ON CONFLICT DO NOTHING``); only a duplicate reads the first version's hash.

Two receipts of one SOP Instance UID (two receivers, or one UID sent with other bytes)
race safely: before its row is inserted, each file is renamed to an instance name of its
own (:meth:`dicom_node.spool.Spool.place`, a random token in the name), so no rename can
replace an acknowledged file; the row stores that name, and the insert decides atomically
which receipt won. The loser's file leaves the instance folder: quarantined when its bytes
differ, removed when they are the same.

Statuses: Out of Resources (0xA700) for what may succeed later (spool above its watermark
or below its free-space floor, an instance over ``storage.max_instance_bytes``); failures
for what never will (unreadable header, invalid UIDs: 0xC000; a deflate bomb: 0xC100).

Duplicate policy (documented in README):

* same SOP Instance UID, identical bytes: acknowledged, nothing stored again, no new analysis;
* same SOP Instance UID, different bytes: acknowledged (so the sender does not retry forever),
  the new bytes are quarantined with reason ``conflicting duplicate``; the first version stays
  the analysed one, so one input never yields two result sets.
"""

from __future__ import annotations

import enum
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import Connection, Engine, insert, select

from ai.uids import is_valid_uid
from dicom_node.audit import AuditKind, Outcome, record, record_now
from dicom_node.dicomio import (
    HEADER_PREFIX_BYTES,
    Selection,
    dump_selection,
    parse_header,
    quiet,
    read_file_meta,
    selection_attributes,
)
from dicom_node.errors import InvalidInstanceError, SpoolError
from dicom_node.inflate import InflateLimitError, inflate_bounded
from dicom_node.phi import remember_phi
from dicom_node.receipts import Receipts
from dicom_node.spool import Spool, StoredFile, file_sha256
from dicom_node.store import db
from dicom_node.store.group_commit import Announcement, Batch, GroupCommit
from dicom_node.store.transitions import add_instance_if_new, touch_study
from dicom_node.tap import Tap

logger = logging.getLogger(__name__)

FILING_HEADER_STOP = Tag(0x0020, 0x000F)  # just past (0020,000E) Series Instance UID


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses the node uses (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # a Deflated data set that inflates beyond storage.max_inflated_bytes. A failure in the
    # "Cannot understand" range, not Out of Resources: a PACS retries 0xA700 for ever, and
    # the same bytes inflate the same way on every retry
    INFLATED_TOO_LARGE = 0xC100
    PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Received:
    """One C-STORE with its data set in memory (tools and tests; no decoding done)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    file_meta: pydicom.dataset.FileMetaDataset
    dataset_bytes: bytes
    calling_ae: str
    peer: str | None = None  # address:port, for the audit trail


@dataclass(frozen=True)
class ReceivedFile:
    """One C-STORE whose data set is a Part 10 file under the spool's ``tmp/``.

    The ingestor takes the file over: it ends in the spool, in the quarantine or removed.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    path: Path
    calling_ae: str
    peer: str | None = None
    # what was written to ``path``, seen as it was written (first bytes, size, sha256)
    tap: Tap | None = None
    # made to the group commit when the data set started to arrive (the listener's)
    announcement: Announcement | None = None


class _Outcome(enum.Enum):
    STORED = "stored"
    IDENTICAL_DUPLICATE = "identical duplicate"
    CONFLICTING_DUPLICATE = "conflicting duplicate"


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str | None
    modality: str | None
    # what the selection rules read (None: not in the parsed prefix, assembly reads the file)
    selection: Selection | None = None


def encode_part10(rec: Received) -> list[bytes]:
    """Preamble + file meta + the dataset bytes exactly as received."""
    meta = io.BytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, rec.file_meta, enforce_standard=True)
    return [meta.getvalue(), rec.dataset_bytes]


def _transfer_syntax(meta: pydicom.dataset.FileMetaDataset) -> UID:
    ts = UID(str(meta.get("TransferSyntaxUID", "")))
    try:
        ts.is_implicit_VR, ts.is_deflated  # noqa: B018 - raise for a UID that is no syntax
    except ValueError as exc:
        raise InvalidInstanceError("file meta names no known transfer syntax") from exc
    return ts


def _filing_part(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The elements of ``ds`` up to Series Instance UID, as they are (none read or converted:
    a deferred or malformed value stays so)."""
    return pydicom.Dataset({tag: ds.get_item(tag, keep_deferred=True) for tag in ds.keys()
                            if tag < FILING_HEADER_STOP})


def read_header(path: Path, sop_instance_uid: str, *, max_inflated_bytes: int,
                tap: Tap | None = None) -> Header:
    """Read the few header values the node files an instance under, in bounded memory.

    From ``tap`` (the file's first bytes, kept while it was written) when the header lies in
    them; else only a prefix of the file's data set is read, a Deflated one inflated as a
    stream, counted and cut to that prefix (InflateLimitError above
    ``max_inflated_bytes``). Raises InvalidInstanceError when the header is unusable.
    """
    parsed = _parse_tap(tap) if tap is not None else None
    if parsed is None:
        parsed = _parse_file(path, max_inflated_bytes)
    return _header(*parsed, sop_instance_uid)


def _parse_tap(tap: Tap) -> tuple[pydicom.Dataset, bool] | None:
    """The header parsed from the tap's bytes; None when they do not hold all of it (or the
    data set is Deflated): the file is read then."""
    try:
        meta, offset = read_file_meta(bytes(tap.head))
        ts = _transfer_syntax(meta)
        if ts.is_deflated:
            return None
        ds, with_selection = parse_header(bytes(tap.head[offset:]),
                                          implicit_vr=ts.is_implicit_VR,
                                          little_endian=ts.is_little_endian,
                                          complete=tap.complete)
    except InvalidInstanceError:
        if tap.complete:  # the whole file was in memory: reading it again changes nothing
            raise
        return None
    return (ds, with_selection) if with_selection or tap.complete else None


def _parse_file(path: Path, max_inflated_bytes: int) -> tuple[pydicom.Dataset, bool]:
    meta, offset = read_file_meta(path)
    ts = _transfer_syntax(meta)
    with open(path, "rb") as fp:
        fp.seek(offset)
        if ts.is_deflated:
            inflated = inflate_bounded(fp, limit=max_inflated_bytes, keep=HEADER_PREFIX_BYTES)
            prefix, complete = inflated.prefix, inflated.complete
        else:
            prefix = fp.read(HEADER_PREFIX_BYTES + 1)
            complete = len(prefix) <= HEADER_PREFIX_BYTES
    return parse_header(prefix[:HEADER_PREFIX_BYTES], implicit_vr=ts.is_implicit_VR,
                        little_endian=ts.is_little_endian, complete=complete)


def _header(ds: pydicom.Dataset, with_selection: bool, sop_instance_uid: str) -> Header:
    # from here on, no log line or stored text can carry these values; the filing header
    # only, as before the selection attributes were parsed here (the worker's full read
    # registers the rest)
    remember_phi(_filing_part(ds))
    try:  # values convert on access: a malformed one (a corrupt VR, say) fails here
        with quiet():
            study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
            modality, sop = ds.get("Modality"), ds.get("SOPInstanceUID")
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any conversion error is a reason
        raise InvalidInstanceError(f"header unreadable: {type(exc).__name__}") from exc
    if not is_valid_uid(study, "received"):
        raise InvalidInstanceError("StudyInstanceUID missing or invalid")
    if sop is not None and str(sop) != sop_instance_uid:
        raise InvalidInstanceError("SOPInstanceUID differs from the C-STORE request")
    return Header(str(study), str(series) if is_valid_uid(series, "received") else None,
                  str(modality)[:16] if modality else None,
                  selection_attributes(ds) if with_selection else None)


class Ingestor:
    """Turns received C-STOREs into spool files and DB rows, returning the status to send."""

    def __init__(self, engine: Engine, spool: Spool, *, max_instance_bytes: int,
                 max_inflated_bytes: int = 128 * 1024 * 1024,
                 commit_timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.spool = spool
        self.max_instance_bytes = max_instance_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self.commit_timeout_s = commit_timeout_s
        self.receipts = Receipts()  # per association: one INFO line when it closes
        # one writer for the rows of every association: one transaction per batch
        self.writer = GroupCommit(engine, name="ingest-writer")
        # called with each file placed under its instance name, before its row is inserted
        # (tests hold two receivers of one UID there)
        self.placed_hook: Callable[[StoredFile], None] | None = None

    def ingest(self, rec: Received) -> StoreStatus:
        """An in-memory data set: written under ``tmp/``, then ingested as a file."""
        refusal = self._refusal(len(rec.dataset_bytes))
        if refusal is not None:
            return self._refuse(rec, *refusal)
        uids_ok = (is_valid_uid(rec.sop_instance_uid, "received")
                   and is_valid_uid(rec.sop_class_uid, "received"))
        # a file meta would have to repeat an invalid UID: keep the raw body only
        chunks = encode_part10(rec) if uids_ok else [rec.dataset_bytes]
        tap = Tap()
        try:
            path = self.spool.write_tmp(chunks, tap)
        except SpoolError as exc:
            return self._refuse(rec, StoreStatus.OUT_OF_RESOURCES, str(exc))
        return self.ingest_file(ReceivedFile(rec.sop_class_uid, rec.sop_instance_uid,
                                             rec.transfer_syntax, path, rec.calling_ae,
                                             rec.peer, tap))

    def ingest_file(self, rec: ReceivedFile) -> StoreStatus:
        """Ingest a received Part 10 file under ``tmp/``; it never stays there."""
        try:
            # other associations' rows may wait for this one (since it started to arrive)
            with self.writer.expect(rec.announcement) as announcement:
                return self._ingest_file(rec, announcement)
        except SpoolError as exc:  # full, or the filesystem failed: the sender may retry
            return self._refuse(rec, StoreStatus.OUT_OF_RESOURCES, str(exc))
        finally:
            rec.path.unlink(missing_ok=True)  # gone already when stored or quarantined

    def _refusal(self, size: int) -> tuple[StoreStatus, str] | None:
        if size > self.max_instance_bytes:
            return (StoreStatus.OUT_OF_RESOURCES,
                    f"{size} B is over storage.max_instance_bytes ({self.max_instance_bytes} B)")
        if self.spool.refusing():
            return (StoreStatus.OUT_OF_RESOURCES, "spool filesystem above "
                    f"storage.high_watermark_pct ({self.spool.watermarks.high_pct} %), "
                    f"not yet below storage.low_watermark_pct "
                    f"({self.spool.watermarks.low_pct} %)")
        return None

    def _ingest_file(self, rec: ReceivedFile, announcement: Announcement) -> StoreStatus:
        size = rec.path.stat().st_size
        refusal = self._refusal(size)
        if refusal is not None:
            return self._refuse(rec, *refusal)
        if not (is_valid_uid(rec.sop_instance_uid, "received")
                and is_valid_uid(rec.sop_class_uid, "received")):
            return self._quarantine(rec, "invalid SOP Instance or Class UID",
                                    StoreStatus.CANNOT_UNDERSTAND)
        # the tap saw every byte written (else: not ours to trust, read the file)
        tap = rec.tap if rec.tap is not None and rec.tap.size == size else None
        try:
            header = read_header(rec.path, rec.sop_instance_uid,
                                 max_inflated_bytes=self.max_inflated_bytes, tap=tap)
        except InflateLimitError as exc:
            return self._quarantine(rec, f"{exc} (storage.max_inflated_bytes)",
                                    StoreStatus.INFLATED_TOO_LARGE)
        except InvalidInstanceError as exc:
            return self._quarantine(rec, str(exc), StoreStatus.CANNOT_UNDERSTAND)
        digest = tap.sha256 if tap is not None else file_sha256(rec.path)
        self.spool.sync_received(rec.path)  # the file's fsync, in this thread
        placed, dirs = self.spool.place(rec.path, rec.sop_instance_uid, digest, size)
        outcome = self._insert(rec, header, placed, dirs, announcement)
        if outcome is _Outcome.CONFLICTING_DUPLICATE:
            return self._quarantine(replace(rec, path=self.spool.unplace(placed.relpath)),
                                    "conflicting duplicate: same SOP Instance UID, "
                                    "different bytes", StoreStatus.SUCCESS)
        if outcome is _Outcome.IDENTICAL_DUPLICATE:
            self.spool.path(placed.relpath).unlink(missing_ok=True)  # its own name only
            logger.debug("duplicate %s with identical bytes: acknowledged",
                         rec.sop_instance_uid)
            self.receipts.duplicate(rec.peer, rec.calling_ae, header.study_uid)
        else:
            logger.debug("stored %s in study %s (%d B)", rec.sop_instance_uid,
                         header.study_uid, size)
            self.receipts.stored(rec.peer, rec.calling_ae, header.study_uid)
        return StoreStatus.SUCCESS

    def _insert(self, rec: ReceivedFile, header: Header, placed: StoredFile,
                dirs: list[Path], announcement: Announcement) -> _Outcome:
        """The placed file's row through the group commit. When no row can have been written
        (the work or the COMMIT failed) the file is removed: it belongs to no row. After a
        timeout the batch may still commit, so the file stays."""
        try:
            if self.placed_hook is not None:
                self.placed_hook(placed)
            return self.writer.run(
                lambda conn, batch: self._write_row(conn, batch, rec, header, placed, dirs),
                timeout_s=self.commit_timeout_s, announcement=announcement)
        except TimeoutError:
            raise
        except Exception as exc:
            self.spool.path(placed.relpath).unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, SpoolError):
                # a directory fsync of the batch
                raise SpoolError(f"cannot make the spool durable: {exc.strerror}") from exc
            raise

    def _write_row(self, conn: Connection, batch: Batch, rec: ReceivedFile, header: Header,
                   placed: StoredFile, dirs: list[Path]) -> _Outcome:
        """In the writer's transaction: the row naming the placed file, unless the UID has
        one (a duplicate: the file is not this row's); else the file's directory fsynced
        before the batch commits, the study and the audit event."""
        now = time.time()
        if not add_instance_if_new(
                conn, sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                study_uid=header.study_uid, series_uid=header.series_uid,
                transfer_syntax=rec.transfer_syntax, modality=header.modality,
                path=placed.relpath, size=placed.size, sha256=placed.sha256,
                calling_ae=rec.calling_ae, received_at=now,
                selection=dump_selection(header.selection)):
            first = conn.execute(select(db.instances.c.sha256).where(
                db.instances.c.sop_instance_uid == rec.sop_instance_uid)).scalar_one()
            return (_Outcome.IDENTICAL_DUPLICATE if first == placed.sha256
                    else _Outcome.CONFLICTING_DUPLICATE)
        for d in dirs:
            batch.fsync_dir(d)
        touch_study(conn, header.study_uid, now)
        record(conn, AuditKind.INSTANCE_RECEIVED, actor=rec.calling_ae, peer=rec.peer,
               subject=rec.sop_instance_uid, at=now,
               detail=f"study {header.study_uid}, {placed.size} B")
        return _Outcome.STORED

    def _quarantine(self, rec: ReceivedFile, reason: str, status: StoreStatus) -> StoreStatus:
        try:
            stored = self.spool.quarantine_file(rec.path)
        except SpoolError as exc:
            logger.error("cannot quarantine input: %s", exc)
            return self._refuse(rec, StoreStatus.OUT_OF_RESOURCES, f"quarantine failed: {exc}")
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(insert(db.quarantine).values(
                sop_instance_uid=rec.sop_instance_uid[:200], path=stored.relpath,
                size=stored.size, sha256=stored.sha256, calling_ae=rec.calling_ae,
                received_at=now, reason=reason))
            record(conn, AuditKind.INSTANCE_QUARANTINED,
                   Outcome.SUCCESS if status == StoreStatus.SUCCESS else Outcome.FAILURE,
                   actor=rec.calling_ae, peer=rec.peer, subject=rec.sop_instance_uid, at=now,
                   detail=f"status 0x{status:04X}: {reason}; kept as {stored.relpath}")
        logger.warning("quarantined input (%s): %s", stored.relpath, reason)
        return status

    def _refuse(self, rec: Received | ReceivedFile, status: StoreStatus,
                reason: str) -> StoreStatus:
        logger.warning("instance %s refused with 0x%04X: %s", rec.sop_instance_uid, status,
                       reason)
        record_now(self.engine, AuditKind.INSTANCE_REFUSED, Outcome.FAILURE,
                   actor=rec.calling_ae, peer=rec.peer, subject=rec.sop_instance_uid,
                   detail=f"status 0x{status:04X}: {reason}")
        return status
