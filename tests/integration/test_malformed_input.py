"""Malformed input (QUALITY 7): pydicom's broken test files, random bytes and fuzzed
mutations of a valid radiograph go through ingest, assembly and the real models. Each ends
with a failure status, quarantine, an ignore or a failed job with a reason; the node stays
alive and the next valid study is processed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from conftest import storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.node import node_settings, query, start_node, studies
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.analysis import load_analyzer
from dicom_node.ingest import Received, StoreStatus
from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROKEN = ["MR_truncated.dcm", "badVR.dcm", "no_meta.dcm", "rtplan_truncated.dcm",
          "ExplVR_LitEndNoMeta.dcm", "no_meta_group_length.dcm"]


def _meta(sop_class: str, sop_uid: str) -> pydicom.dataset.FileMetaDataset:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _raw(body: bytes, sop_class: str = "1.2.840.10008.5.1.4.1.1.1") -> Received:
    uid = generate_uid()
    return Received(sop_class, uid, ExplicitVRLittleEndian, _meta(sop_class, uid), body, "FUZZ")


def _body_of(path: Path) -> bytes:
    """The bytes after the file meta (or the whole file when there is none)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    fp = io.BytesIO(data)
    fp.seek(132)
    pydicom.filereader._read_file_meta_info(fp)  # leaves fp at the first dataset element
    return data[fp.tell():]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("malformed")
    n = start_node(node_settings(tmp / "node", quiet=0.2, **{
        "models.bundles": [str(tiny_bundle)], "models.device": "cpu"}), load_analyzer)
    yield n
    n.stop()


def _settle(node) -> None:  # type: ignore[no-untyped-def]
    wait_until(lambda: all(s.state in ("done", "ignored", "failed")
                           for s in studies(node.settings).values()), 60, what="studies settled")


def test_pydicom_broken_files_and_random_bytes(node) -> None:  # type: ignore[no-untyped-def]
    statuses = []
    for name in BROKEN:
        statuses.append(node.ingestor.ingest(_raw(_body_of(Path(get_testdata_file(name))))))
    for n in (0, 1, 17, 4096):
        statuses.append(node.ingestor.ingest(_raw(os.urandom(n))))
    assert all(isinstance(s, StoreStatus) for s in statuses)
    assert StoreStatus.CANNOT_UNDERSTAND in statuses
    _settle(node)
    for q in query(node.settings, select(db.quarantine)):
        assert q.reason and (node.spool.root / q.path).exists()


def _fuzz_body(seed: int) -> bytearray:
    # UIDs from the seed: random ones change the body's length between hypothesis' replays
    ds = make_image(rows=260, cols=260, seed=seed, study_uid=f"1.2.826.0.1.3680043.9.{seed}")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.StudyInstanceUID}.1"
    ds.SeriesInstanceUID = f"{ds.StudyInstanceUID}.2"
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, pydicom.Dataset(ds))
    return bytearray(fp.getvalue())


def test_a_corrupt_vr_in_the_filing_header_is_refused_by_name(node) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzer in CI: one byte of Modality's VR zeroed ("C\0"): pydicom raises
    NotImplementedError when the value is read, which escaped ingest as a traceback."""
    body = _fuzz_body(100)
    assert body[116:118] == b"CS" and body[112:116] == b"\x08\x00\x60\x00"  # (0008,0060) Modality
    body[117] = 0
    assert node.ingestor.ingest(_raw(bytes(body))) == StoreStatus.CANNOT_UNDERSTAND


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_radiographs_never_crash_the_node(node, data) -> None:  # type: ignore[no-untyped-def]
    body = _fuzz_body(data.draw(st.integers(0, 10**6)))
    mutation = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if mutation == "truncate":
        body = body[: data.draw(st.integers(0, len(body) - 1))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            i = data.draw(st.integers(0, min(len(body) - 1, 2000)))  # mostly the header
            body[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(0, 1500))
        body[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    status = node.ingestor.ingest(_raw(bytes(body)))
    assert isinstance(status, StoreStatus)


def test_next_valid_study_is_processed(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _settle(node)
    jobs = query(node.settings, select(db.jobs))
    assert all(j.state in ("done", "failed") for j in jobs)
    assert all(j.error for j in jobs if j.state == "failed")
    good = make_image(rows=300, cols=280, seed=123)
    assert storescu(node.settings.dicom.port, [write(good, tmp_path)]).returncode == 0
    wait_until(lambda: studies(node.settings)[str(good.StudyInstanceUID)].state == "done", 60,
               what="valid study analysed after the malformed ones")
