"""Leases renewed while a job runs: a long job is never taken over by a second worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until
from helpers.dicomfiles import make_image
from helpers.fakes import FakeAnalyzer
from sqlalchemy import Engine, select, update
from test_ingest import _received

from dicom_node.config import Destination, SelectionSettings
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.studies import StudyAssembler
from dicom_node.worker import AnalysisWorker, JobOutcome


@pytest.fixture
def queued(tmp_path: Path, db_url: str) -> tuple[Engine, Spool]:
    """A real SQLite file (and a PostgreSQL database) with one queued job over two images."""
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    first = make_image()
    for ds in (first, make_image(study_uid=str(first.StudyInstanceUID), seed=1)):
        assert ingestor.ingest(_received(ds)) == StoreStatus.SUCCESS
    assembler = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=0)
    assert len(assembler.run_once(now=time.time() + 1)) == 1
    return engine, spool


def _job(engine: Engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(db.jobs)).one()


def test_heartbeat_renews_while_owned_and_notices_a_lost_lease(queued) -> None:  # type: ignore[no-untyped-def]
    engine, _ = queued
    q = JobQueue(engine, lease_s=1.0, max_attempts=3, heartbeat_s=0.1)
    job = q.claim("w:1:0")
    assert job is not None
    with q.lease(job) as beat:
        wait_until(lambda: beat.renewals >= 3, 10, interval=0.02, what="three renewals")
        assert _job(engine).lease_expires_at > time.time() + 0.5
        with engine.begin() as conn:  # an operator (or another node) took it away
            conn.execute(update(db.jobs).values(lease_owner="other:9:0"))
        wait_until(beat.lost.is_set, 10, interval=0.02, what="lease loss noticed")
        wait_until(lambda: not beat.is_alive(), 10, interval=0.02, what="heartbeat ended")
        assert q.renew(job) is False and _job(engine).lease_owner == "other:9:0"
    # expired, and its lease_seq unchanged for lease_s of this queue's own time: taken over
    assert wait_until(lambda: q.claim("w:1:1", now=time.time() + 5), 10, interval=0.05,
                      what="takeover of the expired lease")


def test_long_job_is_not_taken_over_by_a_second_worker(queued) -> None:  # type: ignore[no-untyped-def]
    engine, spool = queued
    analyzer = FakeAnalyzer(delay_s=3.0)  # three times the lease

    def worker() -> AnalysisWorker:  # each with its own queue, like another process
        return AnalysisWorker(engine, spool, JobQueue(engine, lease_s=1.0, max_attempts=3,
                                                      heartbeat_s=0.25),
                              analyzer, OutputSettings(),
                              [Destination.parse("DEST@127.0.0.1:104")])

    first: list[JobOutcome | None] = []
    running = threading.Thread(target=lambda: first.append(worker().process_one("a:1:0")))
    running.start()
    wait_until(lambda: analyzer.calls, 10, interval=0.01, what="job running")
    second, tries = worker(), 0
    while running.is_alive():  # the second worker polls for as long as the job runs
        assert second.process_one("b:2:0") is None
        tries += 1
        time.sleep(0.05)
    running.join()
    assert tries > 20 and first[0] is not None and first[0].state == "done"
    assert len(analyzer.calls) == 1  # analysed once
    job = _job(engine)
    assert job.state == "done" and job.attempts == 1
    with engine.connect() as conn:
        kinds = sorted(o.kind for o in conn.execute(select(db.outputs)).all())
    assert kinds == ["gsps", "sc", "sc", "sr"]  # exactly one result set
