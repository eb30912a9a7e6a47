"""Exactly one scheduler per database: two real ``dicom-node serve --role scheduler``
processes on one database (PostgreSQL: the advisory lock; SQLite: the file lock); one takes the lock and runs the evaluation schedule, the other
waits; after kill -9 of the first the second takes over and the scheduled runs go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_until
from helpers.node import node_settings, query, write_config
from sqlalchemy import func, select

from dicom_node.store import db

pytestmark = [pytest.mark.integration]

TAKEN = "scheduler lock taken"


def _spawn(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config",
                                 str(config), "--role", "scheduler"], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_second_scheduler_waits_then_takes_over_after_kill9(tmp_path: Path,
                                                             db_url: str) -> None:
    settings = node_settings(tmp_path / "node", **{
        "database.url": db_url,
        "evaluation.jobs": [{"name": "confirmed", "kind": "confirmed",
                             "schedule": {"interval_s": 1}}]})
    config = write_config(settings, tmp_path / "node.yaml")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = select(func.count()).select_from(db.evaluation_runs)
    first = _spawn(config, logs[0])
    procs = [first]
    try:
        wait_until(lambda: TAKEN in logs[0].read_text(), 60, what="first scheduler's lock")
        second = _spawn(config, logs[1])
        procs.append(second)
        wait_until(lambda: "waits to take over" in logs[1].read_text(), 60,
                   what="second scheduler waiting")
        wait_until(lambda: query(settings, runs)[0][0] >= 2, 30, what="scheduled runs")
        assert TAKEN not in logs[1].read_text()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.time()
        wait_until(lambda: TAKEN in logs[1].read_text(), 30, what="takeover")
        started = db.evaluation_runs.c.started_at
        wait_until(lambda: query(settings, select(func.count()).select_from(
            db.evaluation_runs).where(started > killed_at))[0][0] >= 2, 30,
            what="scheduled runs by the second scheduler")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)


def test_scheduler_stops_when_its_postgresql_lock_session_ends(tmp_path: Path,
                                                               postgres_url: str) -> None:
    """The advisory lock dies with its session (server restart, cut connection): the
    scheduler must not go on beside the one that may now take over; it exits with 1."""
    import psycopg

    settings = node_settings(tmp_path / "node", **{"database.url": postgres_url})
    config = write_config(settings, tmp_path / "node.yaml")
    log = tmp_path / "scheduler.log"
    proc = _spawn(config, log)
    try:
        wait_until(lambda: TAKEN in log.read_text(), 60, what="the scheduler lock")
        url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as conn:
            ended = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                                 "WHERE locktype = 'advisory'").fetchall()
        assert ended == [(True,)]
        assert proc.wait(30) == 1
        assert "scheduler lock lost" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
