"""The SC as the worker writes it (JPEG-LS) delivered to a real DCMTK storescp: streamed
from the file when the destination takes its syntax (the dataset arrives byte for byte,
nothing re-read or re-encoded), decompressed by the sender when it takes uncompressed
syntaxes only (the same pixels arrive)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import StoreSCP, free_port, wait_until
from helpers.results import ResultBench
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import _config

pytestmark = pytest.mark.integration


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[StoreSCP] = []

    def make(*extra: str) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"dest{len(started)}", free_port(), extra=list(extra))
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def _bench(tmp_path: Path, scp: StoreSCP) -> ResultBench:
    return ResultBench(tmp_path, [{"ae_title": scp.ae_title, "host": "127.0.0.1",
                                            "port": scp.port, "outputs": ["sc", "sr"]}])


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, after its File Meta Information."""
    with path.open("rb") as fp:
        read_preamble(fp, force=False)
        pydicom.filereader._read_file_meta_info(fp)
        return fp.read()


def _received(scp: StoreSCP, sop_instance_uid: str) -> Path:
    def find() -> Path | None:
        for path in scp.files():
            meta = pydicom.filereader.read_file_meta_info(path)
            if meta.MediaStorageSOPInstanceUID == sop_instance_uid:
                return path
        return None

    return wait_until(find, 10, what="the SC at storescp")


def test_sc_in_the_accepted_syntax_is_streamed_unchanged(
    tmp_path: Path, scp_factory, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    scp = scp_factory("+B")  # bit preserving: storescp writes the dataset as it came
    bench = _bench(tmp_path, scp)
    study = bench.study()
    rows = bench.deliveries(study)
    sent = bench.spool.path(rows["sc"].path)
    assert pydicom.dcmread(sent).file_meta.TransferSyntaxUID == JPEGLSLossless
    reads: list[object] = []
    original = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(a) or original(*a, **k))
    sender = bench.sender(calling_ae="CXR_AI")
    try:
        assert sender.run_once() == 2
    finally:
        bench.close()
    assert reads == []  # the sender parsed no result file: both went out as they are
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # pynetdicom's flag was put back
    rows = bench.deliveries(study)
    assert rows["sc"].state == "sent" and rows["sc"].transfer_syntax == JPEGLSLossless
    received = _received(scp, rows["sc"].sop_instance_uid)
    assert _dataset_bytes(received) == _dataset_bytes(sent)


def test_sc_decompressed_for_a_destination_without_its_syntax(
    tmp_path: Path, scp_factory  # type: ignore[no-untyped-def]
) -> None:
    scp = scp_factory("+x=")  # the default of storescp: uncompressed syntaxes only
    bench = _bench(tmp_path, scp)
    study = bench.study()
    try:
        assert bench.sender().run_once() == 2
    finally:
        bench.close()
    rows = bench.deliveries(study)
    assert rows["sc"].state == "sent" and rows["sc"].transfer_syntax == ExplicitVRLittleEndian
    received = pydicom.dcmread(_received(scp, rows["sc"].sop_instance_uid))
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    written = pydicom.dcmread(bench.spool.path(rows["sc"].path))
    assert np.array_equal(received.pixel_array, written.pixel_array)  # lossless both ways
    assert received.SOPInstanceUID == written.SOPInstanceUID
