"""A node that is running: maximum study wait, late images superseding the result, and a
wall-clock jump while a job runs. Real sockets, a real SQLite file, DCMTK storescp."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEND_EVERY_S = 0.3


def _send_trickle(port: int, images: list[pydicom.Dataset]) -> list[float]:
    """One association (the modality keeps it open), one image every 0.3 s; returns the
    times the Success responses arrived."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(images[0].SOPClassUID),
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
    assert assoc.is_established
    acked = []
    try:
        for ds in images:
            status = assoc.send_c_store(ds)
            assert getattr(status, "Status", None) == 0x0000
            acked.append(time.time())
            time.sleep(SEND_EVERY_S)  # pacing of the sender, not a wait for a result
    finally:
        assoc.release()
    return acked


def test_never_quiet_study_is_analysed_at_max_wait_and_late_images_supersede(
        tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=1.5,
                             **{"studies.max_wait_s": 2.0})
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        first = make_image(seed=0)
        study = str(first.StudyInstanceUID)
        # 20 images over about 6 s: the quiet period (1.5 s) never comes, and max_wait (2 s)
        # falls well inside the trickle even when a loaded machine slows the sender
        images = [first] + [make_image(study_uid=study, seed=i) for i in range(1, 20)]
        acked = _send_trickle(settings.dicom.port, images)
        wait_until(lambda: (jobs := query(settings, select(db.jobs))) and all(
            j.state == "done" for j in jobs) and sum(
            1 for i in query(settings, select(db.instances)) if i.analysis_state == "analysed")
            == len(images), 60, what="every image analysed")
        jobs = query(settings, select(db.jobs).order_by(db.jobs.c.id))
        assert len(jobs) >= 2 and [j.version for j in jobs] == list(range(1, len(jobs) + 1))
        # version 1 was assembled while images kept arriving (the quiet period never came)
        assert jobs[0].created_at < acked[-1] - settings.studies.quiet_period_s
        insts = query(settings, select(db.instances))
        assert 0 < sum(1 for i in insts if i.job_id == jobs[0].id) < len(images)

        outs = query(settings, select(db.outputs).order_by(db.outputs.c.id))
        by_job = {j.id: [o for o in outs if o.job_id == j.id] for j in jobs}
        last = jobs[-1]
        assert sum(1 for o in by_job[last.id] if o.kind == "sc") == len(images)
        for kind in ("sr", "sc", "gsps"):  # one series per kind for every version
            assert len({o.series_uid for o in outs if o.kind == kind}) == 1
        for older, newer in zip(jobs, jobs[1:], strict=False):
            assert {o.superseded_by_job for o in by_job[older.id]} == {newer.id}
            assert not {o.sop_instance_uid for o in by_job[older.id]} & {
                o.sop_instance_uid for o in by_job[newer.id]}
        assert all(o.superseded_at is None for o in by_job[last.id])

        wait_until(lambda: {d.state for d in query(settings, select(db.deliveries))} == {"sent"}
                   and len(dest.files()) >= len(outs), 60, what="every version delivered")
        received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                    for f in dest.files()}
        assert {o.sop_instance_uid for o in outs} <= set(received)
        [sr_prev] = [o for o in by_job[jobs[-2].id] if o.kind == "sr"]
        [sr_last] = [o for o in by_job[last.id] if o.kind == "sr"]
        delivered = pydicom.dcmread(received[sr_last.sop_instance_uid])
        [item] = delivered.PredecessorDocumentsSequence
        [series] = item.ReferencedSeriesSequence
        assert item.StudyInstanceUID == study and series.SeriesInstanceUID == sr_prev.series_uid
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_prev.sop_instance_uid
    finally:
        node.stop()
        dest.stop()


def test_wall_clock_jump_neither_loses_the_lease_nor_runs_the_job_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path / "node", quiet=0.2, **{
        "workers.count": 2, "workers.lease_s": 1.0, "workers.heartbeat_s": 0.25})
    analyzer = FakeAnalyzer(delay_s=3.0)
    node = start_node(settings, lambda s: analyzer)
    try:
        files = [write(make_image(seed=3), tmp_path / "in")]
        assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: analyzer.calls, 30, interval=0.02, what="job running")
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)  # NTP step, say
        wait_until(lambda: [j.state for j in query(settings, select(db.jobs))] == ["done"], 30,
                   what="job done")
        [job] = query(settings, select(db.jobs))
        assert job.attempts == 1 and len(analyzer.calls) == 1  # ran once, by one worker
        assert sorted(o.kind for o in query(settings, select(db.outputs))) == [
            "gsps", "sc", "sr"]
        assert job.finished_at > real_time() + 3000  # committed after the jump, still owned
        assert "lost its lease" not in caplog.text
    finally:
        node.stop()
