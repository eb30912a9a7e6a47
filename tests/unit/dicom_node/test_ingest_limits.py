"""Ingest limits: Deflate inflated with a hard limit in bounded memory, spool watermarks with
hysteresis, and the audit events of the receiving side (received in the row's transaction)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pydicom
import pytest
from helpers.deflate import bomb_image, deflated_body, explicit_le
from helpers.dicomfiles import make_image
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import event, select

from dicom_node.audit import AuditKind
from dicom_node.dicomio import HEADER_PREFIX_BYTES
from dicom_node.disk import DiskUsage
from dicom_node.ingest import Ingestor, Received, StoreStatus
from dicom_node.spool import Spool, Watermarks
from dicom_node.store import db

MiB = 1024 * 1024


def _deflated(ds: pydicom.Dataset, body: bytes) -> Received:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian,
                    meta, body, "PACS", "127.0.0.1:4000")


def _ingestor(tmp_path: Path, **kw) -> Ingestor:  # type: ignore[no-untyped-def]
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    spool = Spool(tmp_path / "spool", watermarks=kw.pop("watermarks", None),
                  **({"disk_usage": kw.pop("disk_usage")} if "disk_usage" in kw else {}))
    return Ingestor(engine, spool, max_instance_bytes=64 * MiB, **kw)


def _rows(ing: Ingestor, table):  # type: ignore[no-untyped-def]
    with ing.engine.connect() as conn:
        return conn.execute(select(table)).all()


def _audit(ing: Ingestor, kind: AuditKind) -> list:  # type: ignore[type-arg]
    return [r for r in _rows(ing, db.audit_events) if r.kind == kind]


def test_deflated_instance_is_stored_as_received(tmp_path: Path) -> None:
    ing = _ingestor(tmp_path)
    ds = make_image()
    rec = _deflated(ds, deflated_body(ds))
    assert ing.ingest(rec) == StoreStatus.SUCCESS
    [row] = _rows(ing, db.instances)
    assert row.study_uid == ds.StudyInstanceUID and row.modality == "CR"
    stored = ing.spool.path(row.path).read_bytes()
    assert stored.endswith(rec.dataset_bytes)  # byte for byte, still deflated
    assert pydicom.dcmread(ing.spool.path(row.path)).PixelData == ds.PixelData


def test_deflate_bomb_refused_with_named_status_and_quarantined(tmp_path: Path) -> None:
    ing = _ingestor(tmp_path, max_inflated_bytes=32 * MiB)
    ds = bomb_image(4096, 4096)  # 32 MiB of zero pixels + the header: just over the limit
    body = deflated_body(ds, zero_pixels=4096 * 4096 * 2)
    assert len(body) < 64 * 1024
    tracemalloc.start()
    try:
        status = ing.ingest(_deflated(ds, body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == StoreStatus.INFLATED_TOO_LARGE == 0xC100
    assert peak < HEADER_PREFIX_BYTES + 4 * MiB, peak  # never the inflated data set
    assert _rows(ing, db.instances) == []
    [q] = _rows(ing, db.quarantine)
    assert "inflates beyond 33554432 B" in q.reason and "max_inflated_bytes" in q.reason
    assert ing.spool.path(q.path).read_bytes().endswith(body)  # the small deflated bytes
    [audit] = _audit(ing, AuditKind.INSTANCE_QUARANTINED)
    assert audit.subject == ds.SOPInstanceUID and "0xC100" in audit.detail
    assert audit.actor == "PACS" and audit.peer == "127.0.0.1:4000"
    assert not any(ing.spool.tmp_dir.iterdir())


@pytest.mark.parametrize("body, reason", [
    (b"\x00\xff" * 100, "corrupt"),
    (deflated_body(make_image())[:-100], "truncated"),
])
def test_broken_deflate_stream_is_quarantined(tmp_path: Path, body: bytes, reason: str) -> None:
    ing = _ingestor(tmp_path)
    ds = make_image()
    assert ing.ingest(_deflated(ds, body)) == StoreStatus.CANNOT_UNDERSTAND
    [q] = _rows(ing, db.quarantine)
    assert reason in q.reason


def test_header_must_lie_in_the_bounded_prefix(tmp_path: Path) -> None:
    ing = _ingestor(tmp_path)
    ds = make_image()
    ds.add_new(0x00090010, "LO", "BLOB")
    ds.add_new(0x00091001, "OB", bytes(HEADER_PREFIX_BYTES))  # before StudyInstanceUID
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    rec = Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", meta,
                   explicit_le(ds), "PACS")
    assert ing.ingest(rec) == StoreStatus.CANNOT_UNDERSTAND
    assert "header not within the first" in _rows(ing, db.quarantine)[0].reason


class FakeDisk:
    def __init__(self) -> None:
        self.used_pct = 50.0

    def __call__(self) -> DiskUsage:
        total = 10**12
        used = int(total * self.used_pct / 100)
        return DiskUsage(total_bytes=total, used_bytes=used, free_bytes=total - used)


def test_watermarks_refuse_above_high_and_accept_only_below_low(tmp_path: Path) -> None:
    disk = FakeDisk()
    ing = _ingestor(tmp_path, watermarks=Watermarks(95, 90), disk_usage=disk)
    results = []
    for pct in (80, 96, 92, 91, 89, 92, 94, 95.5):
        disk.used_pct = pct
        results.append(ing.ingest(_received_plain(make_image())))
    A700, OK = StoreStatus.OUT_OF_RESOURCES, StoreStatus.SUCCESS
    assert results == [OK, A700, A700, A700, OK, OK, OK, A700]
    refused = _audit(ing, AuditKind.INSTANCE_REFUSED)
    assert len(refused) == 4 and all("0xA700" in r.detail and "high_watermark_pct" in r.detail
                                     for r in refused)
    assert len(_rows(ing, db.instances)) == 4
    assert not any(ing.spool.tmp_dir.iterdir())


def _received_plain(ds: pydicom.Dataset) -> Received:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", meta,
                    explicit_le(ds), "PACS", "10.0.0.7:51000")


def test_instance_received_audited_in_the_instance_rows_transaction(tmp_path: Path) -> None:
    ing = _ingestor(tmp_path)
    commits: list[int] = []
    event.listen(ing.engine, "commit", lambda conn: commits.append(1))
    ds = make_image()
    assert ing.ingest(_received_plain(ds)) == StoreStatus.SUCCESS
    assert len(commits) == 1  # instance row, study row and audit event: one transaction
    [audit] = _audit(ing, AuditKind.INSTANCE_RECEIVED)
    [row] = _rows(ing, db.instances)
    assert audit.subject == ds.SOPInstanceUID and audit.actor == "PACS"
    assert audit.peer == "10.0.0.7:51000" and audit.outcome == "success"
    assert audit.at == row.received_at
    assert "Test^Patient" not in str(tuple(audit))  # UIDs and sizes only, no PHI
