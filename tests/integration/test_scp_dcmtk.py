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

from dicom_node.store import db

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


class FakeDisk:
    """The spool's disk-usage source, at a chosen fill level (a full disk without filling one)."""

    def __init__(self, used_pct: float) -> None:
        self.used_pct = used_pct

    def __call__(self):  # type: ignore[no-untyped-def]
        from dicom_node.disk import DiskUsage

        total = 10**12
        used = int(total * self.used_pct / 100)
        return DiskUsage(total_bytes=total, used_bytes=used, free_bytes=total - used)


def test_spool_watermarks_refuse_then_recover_with_hysteresis(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "node", quiet=0.3, **{
        "storage.high_watermark_pct": 95, "storage.low_watermark_pct": 90})
    node = start_node(settings, lambda s: FakeAnalyzer())
    disk = FakeDisk(96.0)
    node.disk_usage = disk  # the node's one disk measurement: watermarks follow it
    try:
        def send(pct: float, seed: int):  # type: ignore[no-untyped-def]
            disk.used_pct = pct
            ds = make_image(seed=seed)
            res = storescu(settings.dicom.port, [write(ds, tmp_path / f"in{seed}")],
                           extra=["-v"])
            stored = {r.sop_instance_uid for r in query(settings, select(db.instances))}
            return res, str(ds.SOPInstanceUID) in stored

        for pct, seed in ((96, 1), (92, 2)):  # above high, then between low and high
            res, stored = send(pct, seed)
            assert not stored
            assert res.returncode != 0  # storescu saw the status: Refused, Out of Resources
            assert "store response (refused: outofresources)" in res.stderr.lower(), res.stderr
        res, stored = send(85, 3)  # below low: accepted again
        assert res.returncode == 0 and stored, res.stderr
        res, stored = send(93, 4)  # between the marks, coming from below: still accepted
        assert res.returncode == 0 and stored, res.stderr
        refused = [r for r in query(settings, select(db.audit_events))
                   if r.kind == "instance_refused"]
        assert len(refused) == 2 and all("0xA700" in r.detail and r.actor == "PACS"
                                         for r in refused)
    finally:
        node.stop()


def test_receiving_side_audit_trail(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = node.settings.dicom.port
    good = [write(make_image(seed=i), tmp_path / "in") for i in range(2)]
    assert storescu(port, good).returncode == 0
    assert storescu(port, good[:1], calling="INTRUDER").returncode != 0  # unknown calling AE
    bad = make_image(seed=9)
    del bad.StudyInstanceUID  # unusable: quarantined with Cannot understand
    storescu(port, [write(bad, tmp_path / "bad")], calling="PACS2")
    rows = query(node.settings, select(db.audit_events))
    by_kind: dict[str, list] = {}  # type: ignore[type-arg]
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    accepted = by_kind["association_accepted"]
    assert {r.actor for r in accepted} == {"PACS", "PACS2"}
    assert all(r.peer.startswith("127.0.0.1:") and "called AE CXR_AI" in r.detail
               for r in accepted)
    [rejected] = by_kind["association_rejected"]
    assert rejected.actor == "INTRUDER" and "calling AE title not recognised" in rejected.detail
    received = {r.subject for r in by_kind["instance_received"]}
    assert received == {str(pydicom.dcmread(f).SOPInstanceUID) for f in good}
    assert len(by_kind["instance_received"]) == len(query(node.settings, select(db.instances)))
    [quarantined] = by_kind["instance_quarantined"]
    assert quarantined.subject == str(bad.SOPInstanceUID) and quarantined.actor == "PACS2"
    assert "0xC000" in quarantined.detail and "StudyInstanceUID" in quarantined.detail
    text = " ".join(str(tuple(r)) for r in rows)
    assert "Test^Patient" not in text and "ACC1" not in text  # no PHI in the audit trail
