"""Ingest: durable write, dedupe policy, quarantine, disk full, path safety."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from helpers.dicomfiles import make_image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.ingest import Ingestor, Received, StoreStatus
from dicom_node.spool import Spool
from dicom_node.store import db


def _received(ds: pydicom.Dataset, *, sop_uid: str | None = None) -> Received:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    body = pydicom.Dataset(ds)  # shallow copy without file meta
    write_dataset(fp, body)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # the request carries sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uid = str(ds.SOPInstanceUID) if sop_uid is None else sop_uid
    return Received(str(ds.SOPClassUID), uid,
                    ExplicitVRLittleEndian, meta, fp.getvalue(), "PACS")


@pytest.fixture
def ingestor(tmp_path: Path, db_url: str) -> Ingestor:
    engine = db.make_engine(db_url)
    return Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=10_000_000)


def _rows(ingestor: Ingestor, table):  # type: ignore[no-untyped-def]
    with ingestor.engine.connect() as conn:
        return conn.execute(select(table)).all()


def test_store_writes_exact_bytes_and_row(ingestor: Ingestor) -> None:
    ds = make_image()
    rec = _received(ds)
    assert ingestor.ingest(rec) == StoreStatus.SUCCESS
    [row] = _rows(ingestor, db.instances)
    assert row.sop_instance_uid == ds.SOPInstanceUID
    assert row.study_uid == ds.StudyInstanceUID
    data = ingestor.spool.path(row.path).read_bytes()
    assert data.endswith(rec.dataset_bytes)  # stored byte for byte after the file meta
    back = pydicom.dcmread(ingestor.spool.path(row.path))
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    [study] = _rows(ingestor, db.studies)
    assert study.state == "receiving"
    assert not any((ingestor.spool.root / "tmp").iterdir())


def test_identical_duplicate_is_acknowledged_once(ingestor: Ingestor) -> None:
    rec = _received(make_image())
    assert ingestor.ingest(rec) == StoreStatus.SUCCESS
    assert ingestor.ingest(rec) == StoreStatus.SUCCESS
    assert len(_rows(ingestor, db.instances)) == 1
    assert _rows(ingestor, db.quarantine) == []


def test_changed_duplicate_is_quarantined_and_first_kept(ingestor: Ingestor) -> None:
    ds = make_image()
    first = _received(ds)
    ingestor.ingest(first)
    ds.PatientName = "Changed^Name"
    assert ingestor.ingest(_received(ds)) == StoreStatus.SUCCESS
    [row] = _rows(ingestor, db.instances)
    assert ingestor.spool.path(row.path).read_bytes().endswith(first.dataset_bytes)
    [q] = _rows(ingestor, db.quarantine)
    assert "conflicting duplicate" in q.reason


@pytest.mark.parametrize("bad_uid", ["../../etc/passwd", "1.2.3/../../x", "", "1.2." + "9" * 80])
def test_bad_sop_uid_never_escapes_spool(ingestor: Ingestor, bad_uid: str, tmp_path: Path) -> None:
    rec = _received(make_image(), sop_uid=bad_uid)
    assert ingestor.ingest(rec) == StoreStatus.CANNOT_UNDERSTAND
    assert _rows(ingestor, db.instances) == []
    [q] = _rows(ingestor, db.quarantine)
    assert ingestor.spool.path(q.path).parent == ingestor.spool.root / "quarantine"
    assert {p.name for p in tmp_path.iterdir()} <= {"node.db", "node.db-wal", "node.db-shm",
                                                     "spool"}
    assert not list(tmp_path.rglob("passwd")) and not list(tmp_path.rglob("x"))


def test_unreadable_header_is_quarantined(ingestor: Ingestor) -> None:
    rec = _received(make_image())
    broken = Received(rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax,
                      rec.file_meta, b"\x08\x00\x16\x00UI\xff\xff" + b"garbage" * 10, "PACS")
    assert ingestor.ingest(broken) == StoreStatus.CANNOT_UNDERSTAND
    assert _rows(ingestor, db.instances) == []
    assert len(_rows(ingestor, db.quarantine)) == 1
    assert not list((ingestor.spool.root / "instances").rglob("*.dcm"))


def test_missing_study_uid_is_quarantined(ingestor: Ingestor) -> None:
    ds = make_image()
    del ds.StudyInstanceUID
    assert ingestor.ingest(_received(ds)) == StoreStatus.CANNOT_UNDERSTAND
    assert "StudyInstanceUID" in _rows(ingestor, db.quarantine)[0].reason


def test_disk_full_answers_out_of_resources_then_recovers(tmp_path: Path, db_url: str) -> None:
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool", min_free_bytes=10**18)  # simulate: never enough space
    ing = Ingestor(engine, spool, max_instance_bytes=10_000_000)
    rec = _received(make_image())
    assert ing.ingest(rec) == StoreStatus.OUT_OF_RESOURCES
    assert not list((spool.root).rglob("*.dcm")) and not any((spool.root / "tmp").iterdir())
    spool.min_free_bytes = 0  # space freed
    assert ing.ingest(rec) == StoreStatus.SUCCESS


def test_enospc_during_write_is_out_of_resources(ingestor: Ingestor, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import os

    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert ingestor.ingest(_received(make_image())) == StoreStatus.OUT_OF_RESOURCES
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not any((ingestor.spool.root / "tmp").iterdir())
    assert _rows(ingestor, db.instances) == []


def test_oversized_instance_refused(tmp_path: Path, db_url: str) -> None:
    engine = db.make_engine(db_url)
    ing = Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=1000)
    assert ing.ingest(_received(make_image())) == StoreStatus.OUT_OF_RESOURCES
