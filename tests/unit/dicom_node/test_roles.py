"""Roles of a process, its owner id and the locks behind them: a slot held by a live process
is never another's, start-up re-queues only the jobs of this slot's dead predecessor, and
one scheduler lock per database (real ``flock`` on real files, a real SQLite database)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers.dicomfiles import make_image, received

from dicom_node.config import SelectionSettings
from dicom_node.ingest import Ingestor
from dicom_node.jobs import JobQueue
from dicom_node.roles import ALL, claim_identity, parse_roles, role_label
from dicom_node.singleton import SchedulerLock
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.studies import StudyAssembler


def test_parse_roles_all_a_list_and_a_clear_error() -> None:
    assert parse_roles("all") == ALL
    assert parse_roles("receiver, WEB") == {"receiver", "web"}
    assert role_label(parse_roles("web,receiver")) == "receiver+web"
    with pytest.raises(ValueError, match="unknown role gpu"):
        parse_roles("receiver,gpu")
    with pytest.raises(ValueError, match="no role given"):
        parse_roles(" , ")


def test_live_processes_hold_distinct_slots_and_a_dead_ones_slot_is_reused(
        tmp_path: Path) -> None:
    roles = parse_roles("worker")
    first, second = claim_identity(tmp_path, roles), claim_identity(tmp_path, roles)
    assert (first.slot, second.slot) == (0, 1) and first.node_id != second.node_id
    assert first.node_id.endswith(":worker.0")
    first.release()  # as the kernel does when the process dies
    again = claim_identity(tmp_path, roles)
    assert again.slot == 0 and again.node_id == first.node_id
    second.release()
    again.release()


def test_start_up_requeue_takes_only_the_dead_predecessors_jobs(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    assembler = StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=0)
    for _ in range(12):
        ingestor.ingest(received(make_image()))
    assert len(assembler.run_once(now=10**10)) == 12
    roles = parse_roles("worker")
    ids = [claim_identity(tmp_path, roles) for _ in range(11)]
    queue = JobQueue(engine, lease_s=3600, max_attempts=3)
    for identity in ids:  # worker.0 .. worker.10 each run a job
        assert queue.claim(f"{identity.node_id}:4242:0") is not None
    ids[1].release()  # worker.1 dies; worker.10 lives on
    restarted = claim_identity(tmp_path, roles)
    assert restarted.slot == 1
    assert queue.requeue_owned_by(f"{restarted.node_id}:") == 1  # not worker.10's
    for identity in [*ids, restarted]:
        identity.release()
    engine.dispose()


def test_one_scheduler_lock_per_sqlite_database(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    first, second = SchedulerLock(engine, poll_s=0.05), SchedulerLock(engine, poll_s=0.05)
    assert first.try_acquire() and first.held()
    assert not second.try_acquire()
    stop = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(stop)))
    waiter.start()
    first.release()
    waiter.join(10)
    assert got == [True] and second.held()
    second.release()
    engine.dispose()


def test_a_receiver_starting_beside_others_keeps_their_partial_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    old, young = spool.tmp_dir / "crashed.part", spool.tmp_dir / "writing.part"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.clean_tmp(older_than_s=3600) == 1
    assert not old.exists() and young.exists()
    assert spool.clean_tmp() == 1 and not young.exists()  # alone on the spool: all of them
