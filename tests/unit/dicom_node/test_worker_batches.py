"""Batched inference across waiting jobs: one claim takes the queued jobs, one analyzer call
covers all their images, and each job still gets its own outputs, commit and failure."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
from conftest import wait_until
from helpers.dicomfiles import make_image
from helpers.fakes import FakeAnalyzer
from sqlalchemy import Engine, func, select
from test_ingest import _received

from dicom_node.config import SelectionSettings
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.studies import StudyAssembler
from dicom_node.worker import AnalysisWorker


def _queue_studies(tmp_path: Path, images: list[list[pydicom.Dataset]], db_url: str
                   ) -> tuple[Engine, Spool]:
    """A real SQLite file (or a PostgreSQL database): one queued job per study of ``images``."""
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    for study in images:
        for ds in study:
            assert ingestor.ingest(_received(ds)) == StoreStatus.SUCCESS
    assembler = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=0)
    assert len(assembler.run_once(now=time.time() + 1)) == len(images)
    return engine, spool


def _study(seed: int, n: int = 1) -> list[pydicom.Dataset]:
    first = make_image(seed=seed)
    return [first] + [make_image(study_uid=str(first.StudyInstanceUID), seed=seed * 10 + i)
                      for i in range(1, n)]


def test_three_queued_jobs_are_claimed_at_once_and_each_gets_its_own_outputs(
        tmp_path: Path, db_url: str) -> None:
    studies = [_study(1, 2), _study(2), _study(3)]
    engine, spool = _queue_studies(tmp_path, studies, db_url)
    analyzer = FakeAnalyzer()
    queue = JobQueue(engine, lease_s=60, max_attempts=3)
    worker = AnalysisWorker(engine, spool, queue, analyzer, OutputSettings(gsps=False), [])
    outcomes = worker.process_batch("w:1:0", 4)
    assert [o.state for o in outcomes] == ["done"] * 3
    assert len(analyzer.calls) == 1 and len(analyzer.calls[0]) == 4  # one call, 4 images
    with engine.connect() as conn:
        jobs = conn.execute(select(db.jobs).order_by(db.jobs.c.id)).all()
        per_job = dict(conn.execute(select(db.outputs.c.job_id, func.count())
                                    .group_by(db.outputs.c.job_id)).all())
        kinds = conn.execute(select(db.outputs.c.job_id, db.outputs.c.study_uid)).all()
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 3
    # SR + one SC per image, per job; each output belongs to its own job's study
    assert [per_job[j.id] for j in jobs] == [3, 2, 2]
    study_of = {j.id: j.study_uid for j in jobs}
    assert all(study_of[job_id] == study_uid for job_id, study_uid in kinds)
    assert worker.process_batch("w:1:0", 4) == []  # nothing left: nothing awaited


def test_claim_many_takes_only_what_is_due_and_keeps_a_studys_jobs_in_order(
        tmp_path: Path, db_url: str) -> None:
    engine, _ = _queue_studies(tmp_path, [_study(1), _study(2)], db_url)
    queue = JobQueue(engine, lease_s=60, max_attempts=3)
    taken = queue.claim_many("w:1:0", 4)
    assert len(taken) == 2 and len({j.study_uid for j in taken}) == 2
    assert queue.claim_many("w:1:1", 4) == []  # both running under a live lease


def test_one_jobs_unusable_study_fails_alone_in_a_batch(tmp_path: Path, db_url: str) -> None:
    bad = _study(2)
    del bad[0].PixelData  # the fake analyzer refuses an image without pixel data
    engine, spool = _queue_studies(tmp_path, [_study(1), bad, _study(3)], db_url)
    analyzer = FakeAnalyzer()
    worker = AnalysisWorker(engine, spool, JobQueue(engine, lease_s=60, max_attempts=3),
                            analyzer, OutputSettings(gsps=False), [])
    states = [o.state for o in worker.process_batch("w:1:0", 3)]
    assert states == ["done", "failed", "done"]
    with engine.connect() as conn:
        failed = conn.execute(select(db.jobs).where(db.jobs.c.state == "failed")).one()
    assert failed.study_uid == str(bad[0].StudyInstanceUID) and "pixel" in failed.error


def test_batch_wait_takes_a_job_queued_during_the_wait_into_the_same_call(
        tmp_path: Path, db_url: str) -> None:
    engine, spool = _queue_studies(tmp_path, [_study(1)], db_url)
    analyzer = FakeAnalyzer()
    worker = AnalysisWorker(engine, spool, JobQueue(engine, lease_s=60, max_attempts=3),
                            analyzer, OutputSettings(gsps=False), [])
    outcomes: list[object] = []
    run = threading.Thread(target=lambda: outcomes.extend(
        worker.process_batch("w:1:0", 2, wait_s=1.0, stop=threading.Event())))
    run.start()
    wait_until(lambda: _states(engine) == ["running"], 10, interval=0.01,
               what="first job claimed")
    ingestor = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    assert ingestor.ingest(_received(_study(2)[0])) == StoreStatus.SUCCESS  # during the wait
    StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=0).run_once(
        now=time.time() + 1)
    run.join(30)
    assert len(outcomes) == 2 and len(analyzer.calls) == 1 and len(analyzer.calls[0]) == 2


def _states(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r.state for r in conn.execute(select(db.jobs.c.state).order_by(db.jobs.c.id))]
