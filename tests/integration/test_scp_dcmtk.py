"""The listener against real DCMTK peers over loopback (service isolated from the models)."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from conftest import require_tool, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node, studies
from sqlalchemy import select

from dicom_node import db

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    fake = FakeAnalyzer()
    settings = node_settings(tmp_path / "node", quiet=0.3,
                             **{"dicom.allowed_calling_aes": ["PACS", "PACS2"]})
    n = start_node(settings, lambda s: fake)
    n.fake = fake  # type: ignore[attr-defined]
    yield n
    n.stop()


def test_echo_and_store_then_analysed(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = node.settings.dicom.port
    echo = subprocess.run([require_tool("echoscu"), "-aec", "CXR_AI", "-aet", "PACS",
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    study = pydicom.uid.generate_uid()
    files = [write(make_image(study_uid=study, seed=i), tmp_path / "in") for i in range(3)]
    res = storescu(port, files)
    assert res.returncode == 0, res.stderr
    rows = query(node.settings, select(db.instances))
    assert sorted(r.sop_instance_uid for r in rows) == sorted(
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    for r, f in zip(sorted(rows, key=lambda r: r.sop_instance_uid),
                    sorted(files, key=lambda f: str(pydicom.dcmread(f).SOPInstanceUID)),
                    strict=True):
        got = pydicom.dcmread(node.spool.path(r.path))
        assert got.PixelData == pydicom.dcmread(f).PixelData
    wait_until(lambda: studies(node.settings)[study].state == "done", 30, what="analysis")
    assert len(node.fake.calls) == 1 and len(node.fake.calls[0]) == 3  # one job, every image
    outs = query(node.settings, select(db.outputs))
    assert sorted(o.kind for o in outs) == ["gsps", "sc", "sc", "sc", "sr"]
    assert {o.study_uid for o in outs} == {study}


def test_wrong_called_ae_and_unknown_calling_ae_rejected(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = write(make_image(), tmp_path / "in")
    wrong_called = storescu(node.settings.dicom.port, [f], called="SOMEONE_ELSE")
    unknown_calling = storescu(node.settings.dicom.port, [f], calling="INTRUDER")
    for res in (wrong_called, unknown_calling):
        assert res.returncode != 0
        assert "Rejected" in res.stderr or "rejected" in res.stderr.lower()
    assert query(node.settings, select(db.instances)) == []


def test_parallel_senders_all_acknowledged_and_stored(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    batches = []
    for b in range(8):
        study = pydicom.uid.generate_uid()
        batches.append([write(make_image(study_uid=study, seed=10 * b + i, rows=256, cols=256),
                              tmp_path / f"in{b}") for i in range(5)])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda fs: storescu(node.settings.dicom.port, fs), batches))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(query(node.settings, select(db.instances))) == 40
    wait_until(lambda: all(s.state == "done" for s in studies(node.settings).values())
               and len(studies(node.settings)) == 8, 60, what="8 studies analysed")


def test_uncompressed_hip_stored_and_ignored(node, realdicom: Path) -> None:  # type: ignore[no-untyped-def]
    res = storescu(node.settings.dicom.port, [realdicom / "cr_hip_fuji_j2k.dcm"])
    assert res.returncode == 0, res.stderr
    study = str(pydicom.dcmread(realdicom / "cr_hip_fuji_j2k.dcm",
                                stop_before_pixels=True).StudyInstanceUID)
    row = wait_until(lambda: (s := studies(node.settings).get(study)) and s.state == "ignored"
                     and s, 30, what="hip ignored")
    assert "body part HIP" in row.reason
    assert node.fake.calls == []


def test_out_of_memory_job_is_retried_while_receiving_continues(tmp_path: Path) -> None:
    from helpers.fakes import FakeAnalyzer as _Fake

    from ai.types import ResourceExhaustedError

    class FlakyAnalyzer(_Fake):
        def analyze(self, datasets):  # type: ignore[no-untyped-def, override]
            if len(self.calls) < 2:
                self.calls.append(["oom"])
                raise ResourceExhaustedError("out of memory on cuda:0 and CPU (simulated)")
            return super().analyze(datasets)

    flaky = FlakyAnalyzer()
    settings = node_settings(tmp_path / "node", quiet=0.2)
    node = start_node(settings, lambda s: flaky)
    try:
        first = make_image(seed=1)
        assert storescu(settings.dicom.port, [write(first, tmp_path / "a")]).returncode == 0
        wait_until(lambda: len(flaky.calls) >= 1, 30, what="first (failing) attempt")
        second = make_image(seed=2)  # the listener keeps acknowledging meanwhile
        assert storescu(settings.dicom.port, [write(second, tmp_path / "b")]).returncode == 0
        wait_until(lambda: all(studies(settings).get(str(d.StudyInstanceUID)) and
                               studies(settings)[str(d.StudyInstanceUID)].state == "done"
                               for d in (first, second)), 60, what="both studies analysed")
        [job1] = [j for j in query(settings, select(db.jobs))
                  if j.study_uid == str(first.StudyInstanceUID)]
        assert job1.attempts >= 2 and job1.state == "done"
    finally:
        node.stop()
