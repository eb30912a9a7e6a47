"""Leases on the database's clock: a forward jump of that clock runs no job twice, and a
worker that stops renewing still has its job taken over.

Two consumers, each with its own JobQueue (as two processes or hosts would), claim, renew
(the real heartbeat) and complete jobs on one real SQLite file; the database's clock is a
:class:`~helpers.clocks.JumpingClock` that the test moves forward by an hour mid-run.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from conftest import wait_until
from helpers.clocks import JumpingClock, ManualClock
from sqlalchemy import Engine, insert, select

from dicom_node.config import SenderSettings
from dicom_node.delivery.ledger import Ledger, add_delivery
from dicom_node.jobs import ClaimedJob, JobQueue
from dicom_node.store import db
from dicom_node.store.states import JobState
from dicom_node.store.transitions import create_job, finish_job

LEASE_S = 0.5
HEARTBEAT_S = 0.1
RUN_S = 3 * LEASE_S  # every job outlives its lease three times: only renewals keep it


@pytest.fixture
def engine(db_url: str) -> Engine:
    """SQLite and PostgreSQL (the database's clock is PostgreSQL's own there)."""
    return db.make_engine(db_url)


def _queue_jobs(engine: Engine, n: int) -> list[int]:
    with engine.begin() as conn:
        return [create_job(conn, f"1.2.826.0.1.3680043.10.99.{i}", time.time())
                for i in range(n)]


def _jobs(engine: Engine) -> list:  # type: ignore[type-arg]
    with engine.connect() as conn:
        return conn.execute(select(db.jobs).order_by(db.jobs.c.id)).all()


class Consumer:
    """A worker loop: claim, run under the heartbeat for ``run_s``, complete if still ours."""

    def __init__(self, engine: Engine, clock: JumpingClock, name: str,
                 executions: Counter[int], lock: threading.Lock) -> None:
        self.engine = engine
        self.queue = JobQueue(engine, lease_s=LEASE_S, max_attempts=3,
                              heartbeat_s=HEARTBEAT_S, clock=clock)
        self.name = name
        self.executions = executions
        self.lock = lock
        self.lost = 0
        self.running: ClaimedJob | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            job = self.queue.claim(self.name)
            if job is None:
                self.stop.wait(0.02)
                continue
            with self.queue.lease(job) as beat:
                self.running = job
                with self.lock:
                    self.executions[job.id] += 1
                beat.lost.wait(RUN_S)  # the work; ends early when the lease is lost
                self.running = None
            with self.engine.begin() as conn:
                if beat.lost.is_set() or not self.queue.still_owned(conn, job):
                    self.lost += 1
                    continue
                finish_job(conn, job.id, job.study_uid, RUN_S, self.queue.clock.now())


def _run(consumers: list[Consumer]) -> None:
    for c in consumers:
        c.thread.start()


def _stop(consumers: list[Consumer]) -> None:
    for c in consumers:
        c.stop.set()
    for c in consumers:
        c.thread.join(timeout=30)


def test_clock_jump_forward_runs_every_job_exactly_once(engine: Engine) -> None:
    ids = _queue_jobs(engine, 2)
    clock, executions, lock = JumpingClock(), Counter[int](), threading.Lock()
    # three consumers for two jobs: one is idle and polls while the jump happens
    consumers = [Consumer(engine, clock, f"host{i}:1:0", executions, lock) for i in (1, 2, 3)]
    _run(consumers)
    try:
        wait_until(lambda: sum(c.running is not None for c in consumers) == 2, 10,
                   interval=0.01, what="two consumers running a job, one polling")
        clock.jump(3600)  # NTP steps the database's clock forward by an hour
        running = [j for j in _jobs(engine) if j.state == JobState.RUNNING]
        # the hazard is real: by the database's clock now every running lease has expired
        assert running and all(j.lease_expires_at < clock.now() for j in running)
        wait_until(lambda: all(j.state == JobState.DONE for j in _jobs(engine)), 30,
                   interval=0.05, what="every job done")
    finally:
        _stop(consumers)
    assert executions == Counter({i: 1 for i in ids})  # every job ran, none twice
    assert [j.attempts for j in _jobs(engine)] == [1] * len(ids)  # none taken over
    assert [c.lost for c in consumers] == [0, 0, 0]
    assert all(j.lease_seq >= 1 + int(RUN_S / HEARTBEAT_S) // 2 for j in _jobs(engine))


def test_worker_that_stops_renewing_is_taken_over_despite_the_jump(engine: Engine) -> None:
    [job_id] = _queue_jobs(engine, 1)
    clock, executions, lock = JumpingClock(), Counter[int](), threading.Lock()
    dead_queue = JobQueue(engine, lease_s=LEASE_S, max_attempts=3, clock=clock)
    dead = dead_queue.claim("dead:1:0")  # claimed, then its process froze: no heartbeat
    assert dead is not None
    clock.jump(3600)
    jumped = time.monotonic()
    survivor = Consumer(engine, clock, "alive:2:0", executions, lock)
    _run([survivor])
    try:
        wait_until(lambda: _jobs(engine)[0].state == JobState.DONE, 30, interval=0.05,
                   what="the stalled job taken over and finished")
        taken_over_after = time.monotonic() - jumped
    finally:
        _stop([survivor])
    [row] = _jobs(engine)
    assert executions == Counter({job_id: 1}) and row.attempts == 2
    assert row.lease_owner is None and survivor.lost == 0
    # first seen stale after the jump: watched for a whole lease of the survivor's own time
    assert taken_over_after >= LEASE_S
    with engine.connect() as conn:  # the frozen worker's late completion is fenced
        assert not dead_queue.still_owned(conn, dead)


def test_claimed_delivery_survives_a_jump_and_a_dead_senders_is_taken(engine: Engine) -> None:
    [job_id] = _queue_jobs(engine, 1)
    with engine.begin() as conn:
        output_id = conn.execute(insert(db.outputs).values(
            job_id=job_id, kind="sr", sop_instance_uid="1.2.3.4", sop_class_uid="1.2.3",
            series_uid="1.2.3.5", study_uid="1.2.3.6", path="results/x.dcm",
            created_at=1000.0)).inserted_primary_key[0]
        add_delivery(conn, output_id, "PACS", 1000.0)
    settings = SenderSettings(timeout_s=10)
    clock_a, clock_b = ManualClock(), ManualClock()
    a = Ledger(engine, settings, random.Random(0), clock_a)
    b = Ledger(engine, settings, random.Random(1), clock_b)
    [claimed] = a.claim()  # sender A is sending it
    assert a.lease_s == 100
    clock_b.jump(3600)  # the database's clock, as B reads it, jumps an hour ahead
    assert b.claim() == []  # expired on that clock, but first seen now: watched
    clock_b.advance(a.lease_s - 1)
    assert b.claim() == []  # not yet stale for a whole lease of B's own time
    clock_b.advance(1)
    [again] = b.claim()  # A sent nothing more (no claim, no outcome): B takes it over
    assert again.id == claimed.id
    with engine.connect() as conn:
        row = conn.execute(select(db.deliveries)).one()
    assert row.state == "sending" and row.lease_seq == 2
