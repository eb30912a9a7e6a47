"""Study assembly, selection rules and the job lease queue."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest
from helpers.dicomfiles import CT, DX, make_image
from sqlalchemy import select
from test_ingest import _received

from dicom_node import db
from dicom_node.config import SelectionSettings, SenderSettings
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.jobs import JobQueue
from dicom_node.selection import rejection_reason
from dicom_node.sender import backoff_delay
from dicom_node.spool import Spool
from dicom_node.studies import StudyAssembler


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    spool = Spool(tmp_path / "spool")
    ing = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    asm = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=10)
    return engine, ing, asm


def _send(ing: Ingestor, ds: pydicom.Dataset) -> None:
    assert ing.ingest(_received(ds)) == StoreStatus.SUCCESS


def _state(engine, study_uid: str):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(db.studies).where(db.studies.c.study_uid == study_uid)).one()


def test_study_waits_for_quiet_period_then_one_job(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    study = "1.2.3.4.5"
    for i in range(3):
        _send(ing, make_image(study_uid=study, seed=i))
    t0 = _state(engine, study).last_received_at
    assert asm.run_once(now=t0 + 5) == []  # still inside the quiet period
    jobs = asm.run_once(now=t0 + 11)
    assert len(jobs) == 1
    with engine.connect() as conn:
        insts = conn.execute(select(db.instances)).all()
    assert {i.job_id for i in insts} == {jobs[0]} and {i.analysis_state for i in insts} == {
        "selected"}
    assert _state(engine, study).state == "queued"
    assert asm.run_once(now=t0 + 100) == []  # not twice


def test_ct_and_lateral_are_ignored_with_reason(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    ct = make_image(sop_class=CT, modality="CT", view="", body_part="CHEST")
    lat = make_image(sop_class=DX, modality="DX", view="LL")
    _send(ing, ct)
    _send(ing, lat)
    asm.run_once(now=_state(engine, ct.StudyInstanceUID).last_received_at + 60)
    s_ct, s_lat = _state(engine, ct.StudyInstanceUID), _state(engine, lat.StudyInstanceUID)
    assert s_ct.state == "ignored" and "not a projection radiograph" in s_ct.reason
    assert s_lat.state == "ignored" and "view position LL" in s_lat.reason
    with engine.connect() as conn:
        assert conn.execute(select(db.jobs)).all() == []


def test_mixed_study_analyses_frontal_only(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    pa = make_image(view="PA")
    lat = make_image(study_uid=pa.StudyInstanceUID, view="LL", seed=2)
    _send(ing, pa)
    _send(ing, lat)
    [job] = asm.run_once(now=_state(engine, pa.StudyInstanceUID).last_received_at + 60)
    with engine.connect() as conn:
        rows = {r.sop_instance_uid: r for r in conn.execute(select(db.instances)).all()}
    assert rows[pa.SOPInstanceUID].job_id == job
    assert rows[lat.SOPInstanceUID].analysis_state == "ignored"
    assert "LL" in rows[lat.SOPInstanceUID].reason


def test_real_files_selection(realdicom: Path) -> None:
    rules = SelectionSettings()
    hdr = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in realdicom.glob("*.dcm")}
    assert rejection_reason(hdr["cr_chest_pa_philips_j2k.dcm"], rules) is None
    assert rejection_reason(hdr["dx_chest_nih_cxr14_sc.dcm"], rules) is None
    assert "HIP" in (rejection_reason(hdr["cr_hip_fuji_j2k.dcm"], rules) or "")


def test_job_lease_claim_expiry_and_requeue(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    ds = make_image()
    _send(ing, ds)
    [job_id] = asm.run_once(now=_state(engine, ds.StudyInstanceUID).last_received_at + 60)
    q = JobQueue(engine, lease_s=30, max_attempts=2)
    job = q.claim("hostA:1:0", now=1000.0)
    assert job is not None and job.id == job_id and job.attempts == 1
    assert q.claim("hostA:1:1", now=1010.0) is None  # leased
    again = q.claim("hostB:9:0", now=1031.0)  # lease expired: another worker re-runs it
    assert again is not None and again.attempts == 2
    assert q.fail(job, "late failure of the first owner", permanent=False) == "lost"
    assert q.fail(again, "boom", permanent=False) == "failed"  # attempts exhausted
    with engine.connect() as conn:
        row = conn.execute(select(db.jobs)).one()
    assert row.state == "failed" and "boom" in row.error
    assert _state(engine, ds.StudyInstanceUID).state == "failed"


def test_requeue_owned_by_restarted_node(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    ds = make_image()
    _send(ing, ds)
    asm.run_once(now=_state(engine, ds.StudyInstanceUID).last_received_at + 60)
    q = JobQueue(engine, lease_s=3600, max_attempts=3)
    assert q.claim("me:abc:123:0") is not None
    assert q.requeue_owned_by("other:") == 0
    assert q.requeue_owned_by("me:abc") == 1
    assert q.claim("me:abc:456:0") is not None


def test_backoff_doubles_caps_and_jitters() -> None:
    s = SenderSettings(backoff_initial_s=2, backoff_max_s=30, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(n, s, rng) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    sj = SenderSettings(backoff_initial_s=10, backoff_max_s=100, jitter=0.2)
    delays = [backoff_delay(1, sj, rng) for _ in range(200)]
    assert 8 <= min(delays) < 9.5 and 10.5 < max(delays) <= 12
