"""Study assembly, selection rules and the job lease queue."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pydicom
import pytest
from helpers.clocks import ManualClock
from helpers.counting import record_begins
from helpers.dicomfiles import CT, DX, make_image
from sqlalchemy import select, update
from test_ingest import _received

from ai.selection import rejection_reason
from dicom_node.backoff import backoff_delay as shared_backoff
from dicom_node.config import SelectionSettings, SenderSettings
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.jobs import JobQueue, RetryPolicy
from dicom_node.sender import backoff_delay
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.store.states import StudyState
from dicom_node.store.transitions import settle_study
from dicom_node.studies import StudyAssembler


@pytest.fixture(params=["own transaction", "ingest writer"])
def env(request: pytest.FixtureRequest, tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    """Each assembly test runs both ways: the assembler's writes in transactions of its own
    and in the ingest's group commit (the node's wiring)."""
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool")
    ing = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    writer = ing.writer if request.param == "ingest writer" else None
    asm = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=10, writer=writer)
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
    rules = SelectionSettings().to_rules()
    hdr = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in realdicom.glob("*.dcm")}
    assert rejection_reason(hdr["cr_chest_pa_philips_j2k.dcm"], rules) is None
    assert rejection_reason(hdr["dx_chest_nih_cxr14_sc.dcm"], rules) is None
    assert "HIP" in (rejection_reason(hdr["cr_hip_fuji_j2k.dcm"], rules) or "")


def test_job_lease_claim_expiry_and_requeue(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    ds = make_image()
    _send(ing, ds)
    [job_id] = asm.run_once(now=_state(engine, ds.StudyInstanceUID).last_received_at + 60)
    clock = ManualClock()  # the claimer's own monotonic time
    q = JobQueue(engine, lease_s=30, max_attempts=2, clock=clock)
    job = q.claim("hostA:1:0", now=1000.0)
    assert job is not None and job.id == job_id and job.attempts == 1
    assert q.claim("hostA:1:1", now=1010.0) is None  # leased
    assert q.claim("hostB:9:0", now=1031.0) is None  # expired: watched for lease_s first
    clock.advance(30)  # no renewal for lease_s of the claimer's own time: its worker died
    again = q.claim("hostB:9:0", now=1061.0)  # another worker re-runs it
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


# -- retries: backoff, attempts across restarts, poison pill ---------------------------------

def _job(engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(db.jobs)).one()


def _queued_study(env) -> str:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    ds = make_image()
    _send(ing, ds)
    assert asm.run_once(now=_state(engine, ds.StudyInstanceUID).last_received_at + 60)
    return str(ds.StudyInstanceUID)


def test_shared_backoff_grows_caps_and_jitters_within_bounds() -> None:
    rng = random.Random(7)
    plain = [shared_backoff(n, initial_s=1, max_s=20, jitter=0, rng=rng) for n in range(1, 8)]
    assert plain == [1, 2, 4, 8, 16, 20, 20]
    assert shared_backoff(10_000, initial_s=1, max_s=20, jitter=0, rng=rng) == 20  # no overflow
    spread = [shared_backoff(3, initial_s=1, max_s=20, jitter=0.5, rng=rng) for _ in range(500)]
    assert 2.0 <= min(spread) < 2.3 and 5.7 < max(spread) <= 6.0  # 4 s +/- 50 %
    one, two = random.Random(11), random.Random(11)  # seeded: reproducible
    assert [shared_backoff(3, initial_s=1, max_s=20, jitter=0.5, rng=one) for _ in range(5)] \
        == [shared_backoff(3, initial_s=1, max_s=20, jitter=0.5, rng=two) for _ in range(5)]
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        shared_backoff(1, initial_s=5, max_s=1, jitter=0, rng=rng)


def test_failed_job_is_not_reclaimed_before_its_backoff(env) -> None:  # type: ignore[no-untyped-def]
    engine = env[0]
    study = _queued_study(env)
    retry = RetryPolicy(backoff_initial_s=10, backoff_max_s=25, jitter=0.0)
    q = JobQueue(engine, lease_s=30, max_attempts=5, retry=retry)
    now, delays = 1000.0, []
    for attempt in range(1, 5):
        job = q.claim("w", now=now)
        assert job is not None and job.attempts == attempt
        assert q.fail(job, f"transient {attempt}", permanent=False, now=now) == "queued"
        row = _job(engine)
        assert row.state == "queued" and row.lease_owner is None
        delays.append(row.next_attempt_at - now)
        assert q.claim("w", now=row.next_attempt_at - 0.01) is None  # not before it is due
        now = row.next_attempt_at
    assert delays == [10, 20, 25, 25]  # doubled, capped
    last = q.claim("w", now=now)
    assert last is not None and last.attempts == 5
    assert q.fail(last, "transient 5", permanent=False, now=now) == "failed"
    assert _job(engine).state == "failed" and _job(engine).error == "transient 5"
    assert _state(engine, study).state == "failed"
    assert _state(engine, study).reason == "analysis failed: transient 5"


def test_retry_delays_are_jittered_per_job(env) -> None:  # type: ignore[no-untyped-def]
    engine = env[0]
    _queued_study(env)
    q = JobQueue(engine, lease_s=30, max_attempts=50, rng=random.Random(3),
                 retry=RetryPolicy(backoff_initial_s=10, backoff_max_s=10, jitter=0.2))
    delays, now = [], 0.0
    for _ in range(20):
        job = q.claim("w", now=now)
        assert job is not None
        q.fail(job, "x", permanent=False, now=now)
        delays.append(_job(engine).next_attempt_at - now)
        now = _job(engine).next_attempt_at
    assert all(8.0 <= d <= 12.0 for d in delays) and len({round(d, 6) for d in delays}) > 10


def test_interrupted_job_keeps_its_attempts_and_poison_pill_ends_failed(env) -> None:  # type: ignore[no-untyped-def]
    engine = env[0]
    study = _queued_study(env)
    q = JobQueue(engine, lease_s=3600, max_attempts=3)
    for attempt in (1, 2, 3):
        job = q.claim(f"me:abc:{attempt}:0")  # a fresh process after each crash
        assert job is not None and job.attempts == attempt
        assert q.requeue_owned_by("me:abc") == 1
    row = _job(engine)
    assert row.state == "failed" and row.attempts == 3 and row.lease_owner is None
    assert "interrupted 3 time(s)" in row.error and row.finished_at is not None
    s = _state(engine, study)
    assert s.state == "failed" and "interrupted 3 time(s)" in s.reason
    assert q.claim("me:abc:4:0") is None and q.requeue_owned_by("me:abc") == 0  # no loop


def test_expired_lease_with_attempts_exhausted_is_failed_not_rerun(env) -> None:  # type: ignore[no-untyped-def]
    engine = env[0]
    study = _queued_study(env)
    clock = ManualClock()
    q = JobQueue(engine, lease_s=30, max_attempts=2, clock=clock)
    assert q.claim("hostA:1:0", now=1000.0) is not None
    assert q.claim("hostB:1:0", now=1031.0) is None  # expired: watched for lease_s
    clock.advance(30)
    assert q.claim("hostB:1:0", now=1061.0) is not None  # A died: B takes over (attempt 2)
    assert q.claim("hostC:1:0", now=1092.0) is None  # B's lease expired: watched
    clock.advance(30)
    assert q.claim("hostC:1:0", now=1122.0) is None  # B died too: attempts exhausted
    row = _job(engine)
    assert row.state == "failed" and "lease expired on attempt 2" in row.error
    assert _state(engine, study).state == "failed"


# -- one job per study at a time, result versions ---------------------------------------------

def test_jobs_of_one_study_run_in_order_with_versions(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    study = _queued_study(env)
    q = JobQueue(engine, lease_s=30, max_attempts=3)
    first = q.claim("w1", now=1000.0)
    assert first is not None and first.version == 1
    _send(ing, make_image(study_uid=study, seed=5))  # a late image re-opens the study
    assert _state(engine, study).state == "receiving"
    [second_id] = asm.run_once(now=_state(engine, study).last_received_at + 60)
    assert q.claim("w2", now=1001.0) is None  # waits for the study's earlier job
    with engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == first.id).values(state="done"))
        settle_study(conn, study, first.id, StudyState.DONE, None, 1002.0)
    assert _state(engine, study).state == "queued"  # the next version is still to come
    second = q.claim("w2", now=1003.0)
    assert second is not None and second.id == second_id and second.version == 2
    assert _state(engine, study).state == "analysing"


# -- maximum study wait -----------------------------------------------------------------------

def test_study_that_never_gets_quiet_is_assembled_at_max_wait(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, _ = env
    asm = StudyAssembler(engine, ing.spool, SelectionSettings(), quiet_period_s=10,
                         max_wait_s=5)
    study = "1.2.3.4.6"
    _send(ing, make_image(study_uid=study, seed=1))
    t0 = _state(engine, study).receiving_since
    assert t0 == _state(engine, study).first_received_at
    _send(ing, make_image(study_uid=study, seed=2))
    assert _state(engine, study).receiving_since == t0  # same round
    last = _state(engine, study).last_received_at
    assert asm.run_once(now=t0 + 4.9) == []  # neither quiet nor at max wait
    [job1] = asm.run_once(now=t0 + 5.0)  # not quiet (last image < 10 s ago), but max wait
    assert t0 + 5.0 - last < 10
    _send(ing, make_image(study_uid=study, seed=3))  # keeps arriving: a new round
    s = _state(engine, study)
    assert s.state == "receiving" and s.receiving_since > t0
    assert asm.run_once(now=s.receiving_since + 4.9) == []
    [job2] = asm.run_once(now=s.receiving_since + 5.0)
    with engine.connect() as conn:
        by_job = {r.job_id for r in conn.execute(select(db.instances)).all()}
    assert by_job == {job1, job2} and job2 > job1


def test_old_database_without_round_start_uses_first_image(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, _ = env
    asm = StudyAssembler(engine, ing.spool, SelectionSettings(), quiet_period_s=10,
                         max_wait_s=5)
    ds = make_image()
    _send(ing, ds)
    with engine.begin() as conn:  # a row written before studies.receiving_since existed
        conn.execute(update(db.studies).values(receiving_since=None))
    first = _state(engine, ds.StudyInstanceUID).first_received_at
    assert asm.run_once(now=first + 4.9) == [] and len(asm.run_once(now=first + 5.0)) == 1


def test_image_arriving_while_assembling_is_not_left_behind(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine, ing, _ = env
    asm = StudyAssembler(engine, ing.spool, SelectionSettings(), quiet_period_s=10,
                         max_wait_s=5)
    ds = make_image()
    _send(ing, ds)
    t0 = _state(engine, ds.StudyInstanceUID).receiving_since
    classify = asm._classify
    late = make_image(study_uid=ds.StudyInstanceUID, seed=9)

    def classify_then_receive(relpath: str) -> str | None:
        if _count_instances(engine) == 1:
            _send(ing, late)  # arrives between reading the pending images and the commit
        return classify(relpath)

    monkeypatch.setattr(asm, "_classify", classify_then_receive)
    assert asm.assemble(str(ds.StudyInstanceUID), t0 + 6) is None  # retried next round
    monkeypatch.setattr(asm, "_classify", classify)
    [job] = asm.run_once(now=t0 + 6)
    with engine.connect() as conn:
        assert {r.job_id for r in conn.execute(select(db.instances)).all()} == {job}


def _count_instances(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return len(conn.execute(select(db.instances.c.id)).all())


# -- completion by association release ---------------------------------------------------------

def _release(engine, study: str, at: float) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.store.transitions import release_studies

    with engine.begin() as conn:
        assert release_studies(conn, [study], at) == 1


def test_released_study_is_ready_after_the_grace_not_the_quiet_period(env, caplog) -> None:  # type: ignore[no-untyped-def]
    engine, ing, _ = env
    asm = StudyAssembler(engine, ing.spool, SelectionSettings(), quiet_period_s=10,
                         release_grace_s=1.0)
    ds = make_image()
    study = str(ds.StudyInstanceUID)
    _send(ing, ds)
    last = _state(engine, study).last_received_at
    assert asm.run_once(now=last + 5) == []  # not released: the quiet period rules
    _release(engine, study, last + 5)
    assert asm.run_once(now=last + 5.9) == []  # inside the grace
    caplog.set_level("INFO", logger="dicom_node.studies")
    woken = []
    asm.on_job = lambda: woken.append(True)
    [job] = asm.run_once(now=last + 6.0)
    assert woken == [True]
    assert f"study {study} ready (released): job {job} with 1 image(s)" in caplog.text
    # a fresh assembler (a restart) reads the release from the database
    assert _state(engine, study).released_at == last + 5


def test_image_after_the_release_waits_for_the_next_release_or_the_quiet_period(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, _ = env
    ds = make_image()
    study = str(ds.StudyInstanceUID)
    _send(ing, ds)
    _release(engine, study, _state(engine, study).last_received_at)
    _send(ing, make_image(study_uid=study, seed=2))  # within the grace, another association
    last = _state(engine, study).last_received_at
    restarted = StudyAssembler(engine, ing.spool, SelectionSettings(), quiet_period_s=10,
                               release_grace_s=1.0)
    assert restarted.run_once(now=last + 5) == []  # the release predates the last image
    assert len(restarted.run_once(now=last + 10)) == 1  # the quiet period, as before


def test_release_grace_off_ignores_releases(env) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env  # release_grace_s None: the quiet period and max wait only
    ds = make_image()
    _send(ing, ds)
    last = _state(engine, ds.StudyInstanceUID).last_received_at
    _release(engine, str(ds.StudyInstanceUID), last)
    assert asm.run_once(now=last + 5) == [] and len(asm.run_once(now=last + 10)) == 1


def test_an_older_database_gets_released_at_and_keeps_working(tmp_path: Path,
                                                              db_url: str) -> None:
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE studies DROP COLUMN released_at")
    assert db.add_missing_columns(engine) == ["studies.released_at"]
    spool = Spool(tmp_path / "spool")
    ing = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    ds = make_image()
    _send(ing, ds)  # a study of the upgraded database: not released, the quiet period rules
    last = _state(engine, ds.StudyInstanceUID).last_received_at
    asm = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=10,
                         release_grace_s=1.0)
    assert asm.run_once(now=last + 5) == [] and len(asm.run_once(now=last + 10)) == 1


def test_assembly_writes_in_the_ingest_writer_and_only_reads_in_its_own_thread(
        tmp_path: Path, db_url: str) -> None:
    """The node's wiring: the job's transaction is a batch of the ingest's group commit (one
    writer in the process, no wait for SQLite's lock against it); the assembler's own
    thread only reads, and on SQLite with deferred BEGINs."""
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool")
    ing = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    asm = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=10,
                         writer=ing.writer)
    study = "1.2.3.4.77"
    for i in range(2):
        _send(ing, make_image(study_uid=study, seed=i))
    t0 = _state(engine, study).last_received_at
    commits_before = ing.writer.commits
    begins, stop = record_begins(engine)
    jobs = asm.run_once(now=t0 + 11)
    stop()
    assert len(jobs) == 1 and _state(engine, study).state == "queued"
    assert ing.writer.commits == commits_before + 1
    here = threading.current_thread().name
    assert begins and all(read_only for name, read_only in begins if name == here), begins
    assert any(name == ing.writer.name and not read_only for name, read_only in begins)


def test_the_node_gives_its_assembler_the_ingest_writer_on_sqlite_only(tmp_path: Path,
                                                                      db_url: str) -> None:
    """SQLite has one write lock, waited for by sleeping: there the assembly shares the
    ingest's writer. PostgreSQL queues row locks: there it keeps its own transactions, so a
    batch never holds the study rows of ingest and assembly at once."""
    from helpers.node import node_settings

    from dicom_node.service import Node

    node = Node(node_settings(tmp_path / "node", **{"database.url": db_url}),
                lambda _s: None)
    try:
        expected = node.ingestor.writer if db_url.startswith("sqlite") else None
        assert node.assembler.writer is expected
    finally:
        node.stop()
