"""Runs: the database guard against overlap, interrupted runs, failures, floors and alerts,
the catch-up arithmetic, and a database created before the owner/summary columns."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from evalhelpers import (
    FixedAnalyzer,
    ReferenceSet,
    eval_settings,
    make_reference_set,
    reference_job,
    temp_engine,
)
from sqlalchemy import Engine, create_engine, insert, select, text

from dicom_node.evaluation.errors import EvaluationBusyError, UnknownJobError
from dicom_node.evaluation.service import EvaluationService
from dicom_node.evaluation.settings import ScheduleSettings
from dicom_node.evaluation.store import RunStore, process_owner
from dicom_node.scheduler import missed_fire_times
from dicom_node.store import db


@pytest.fixture
def engine(tmp_path: Path, db_url: str) -> Iterator[Engine]:
    yield from temp_engine(tmp_path, db_url)


@pytest.fixture(scope="module")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


def _service(engine: Engine, tmp_path: Path, refset: ReferenceSet, analyzer: FixedAnalyzer,
             **job: object) -> EvaluationService:
    return EvaluationService(engine, eval_settings(tmp_path / "data",
                                                   [reference_job(refset, **job)]),
                             deployed=lambda: analyzer)


def test_db_guard_refuses_a_second_running_run(engine: Engine, tmp_path: Path,
                                               refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, refset, FixedAnalyzer(refset.probs, delay_s=0.1))
    run_id = service.trigger_run("ref", "api")  # background thread
    with pytest.raises(EvaluationBusyError, match=rf"'ref' is already running \(run {run_id}"):
        service.trigger_run("ref", "manual")
    # another process (own engine, same database file) is refused by the database itself
    other = RunStore(db.make_engine(str(engine.url)))
    with pytest.raises(EvaluationBusyError, match="already running"):
        other.start_run("ref", "reference", "manual")
    info = service.wait(run_id, timeout=30)
    assert info is not None and info.state == "succeeded"
    assert service.trigger_run("ref", "manual") > run_id  # free again once it ended


def test_unknown_job_names_the_configured_ones(engine: Engine, tmp_path: Path,
                                               refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, refset, FixedAnalyzer())
    with pytest.raises(UnknownJobError, match=r"unknown evaluation job 'nope' \(configured: ref\)"):
        service.trigger_run("nope")


def _running_row(engine: Engine, owner: str | None, started_at: float | None = None) -> int:
    with engine.begin() as conn:
        return int(conn.execute(insert(db.evaluation_runs).values(
            job_name="ref", kind="reference", trigger="schedule", state="running",
            started_at=started_at or time.time(), alerts=0, owner=owner)
        ).inserted_primary_key[0])


def test_run_of_a_dead_process_is_marked_interrupted(engine: Engine, tmp_path: Path,
                                                     refset: ReferenceSet) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = _running_row(engine, f"{socket.gethostname()}:{dead}:abc")
    service = _service(engine, tmp_path, refset, FixedAnalyzer(refset.probs))
    assert service.trigger_run("ref", "manual") > stale  # the guard recovered it first
    with engine.connect() as conn:
        row = conn.execute(select(db.evaluation_runs).where(db.evaluation_runs.c.id == stale)).one()
    assert row.state == "failed" and row.error.startswith("interrupted")


def test_same_pid_from_an_earlier_process_and_live_owner(engine: Engine) -> None:
    store = RunStore(engine)
    earlier = _running_row(engine, f"{socket.gethostname()}:{os.getpid()}:0ldt0ken")
    assert store.recover_interrupted() == [earlier]  # e.g. PID 1 again in a new container
    live = _running_row(engine, process_owner())
    assert store.recover_interrupted() == []
    with pytest.raises(EvaluationBusyError):
        store.start_run("ref", "reference", "manual")
    store.fail_run(live, "test")


def test_failing_run_is_recorded_with_its_error(engine: Engine, tmp_path: Path,
                                                refset: ReferenceSet,
                                                caplog: pytest.LogCaptureFixture) -> None:
    service = _service(engine, tmp_path, refset,
                       FixedAnalyzer(fail_with=RuntimeError("CUDA out of memory")))
    with caplog.at_level(logging.ERROR):
        run = service.run_now("ref").run
    assert run.state == "failed" and run.error == "RuntimeError: CUDA out of memory"
    assert run.finished_at is not None
    assert f"run {run.id} failed" in caplog.text


def test_model_not_loaded_fails_with_the_reason(engine: Engine, tmp_path: Path,
                                                refset: ReferenceSet) -> None:
    settings = eval_settings(tmp_path / "data", [reference_job(refset)], model_wait_s=0.2)
    service = EvaluationService(engine, settings, deployed=lambda: None)
    assert "not loaded after 0.2 s" in (service.run_now("ref").run.error or "")
    service = EvaluationService(engine, settings, deployed=lambda: None,
                                model_error=lambda: "BundleError: weights hash mismatch")
    assert "weights hash mismatch" in (service.run_now("ref").run.error or "")


def test_floor_breach_creates_alert_row_and_warning(engine: Engine, tmp_path: Path,
                                                    refset: ReferenceSet,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    floors = {"nodule": {"sensitivity": 0.8, "specificity": 0.6},  # 0.75 < 0.8; 0.667 ok
              "cardiomegaly": {"sensitivity": 0.9}}  # undefined (no positive): no alert
    service = _service(engine, tmp_path, refset, FixedAnalyzer(refset.probs), floors=floors)
    with caplog.at_level(logging.INFO):
        detail = service.run_now("ref")
    assert detail.run.alerts == 1
    (alert,) = detail.alerts
    assert (alert.label, alert.metric, alert.floor, alert.job_name) == (
        "nodule", "sensitivity", 0.8, "ref")
    assert alert.value == pytest.approx(0.75) and alert.acknowledged_at is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ALERT" in r.getMessage() and "nodule sensitivity 0.750 below floor 0.800"
               in r.getMessage() for r in warnings)
    assert "cardiomegaly sensitivity undefined" in caplog.text
    assert [a.id for a in service.list_alerts()] == [alert.id]
    assert service.acknowledge_alert(alert.id) and service.list_alerts() == []
    latest = service.latest_figures()
    assert [(j.job_name, j.run_id) for j in latest] == [("ref", detail.run.id)]
    assert {f.label for f in latest[0].figures} == {"nodule", "cardiomegaly"}
    assert latest[0].as_dict()["figures"][0]["sensitivity"]["value"] is None  # JSON-safe
    jobs = service.list_jobs()
    assert jobs[0].last_run is not None and jobs[0].last_run.id == detail.run.id
    assert jobs[0].as_dict()["floors"]["nodule"]["sensitivity"] == 0.8


def test_history_lists_succeeded_runs_oldest_first(engine: Engine, tmp_path: Path,
                                                   refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, refset, FixedAnalyzer(refset.probs))
    ids = [service.run_now("ref").run.id for _ in range(2)]
    hist = service.history("ref", "nodule")
    assert [run.id for run, _ in hist] == ids
    assert all(f.label == "nodule" and f.tp == 3 for _, f in hist)


def _ts(text_: str) -> float:
    return datetime.fromisoformat(text_).timestamp()


def test_missed_fire_times_cron_and_interval() -> None:
    daily = ScheduleSettings(cron="0 2 * * *")
    last = _ts("2026-03-01T02:00:00.300+00:00")  # the 1 March run
    assert missed_fire_times(daily, UTC, last, _ts("2026-03-01T23:00:00+00:00")) == []
    missed = missed_fire_times(daily, UTC, last, _ts("2026-03-04T09:00:00+00:00"))
    assert [datetime.fromtimestamp(t, UTC).day for t in missed] == [2, 3, 4]
    hourly = ScheduleSettings(interval_s=3600)
    assert len(missed_fire_times(hourly, UTC, 0.0, 3 * 3600 + 10)) == 3
    assert missed_fire_times(hourly, UTC, 0.0, 3599) == []


def test_old_database_gets_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    raw = create_engine(url)
    with raw.begin() as conn:  # evaluation_runs as the first schema had it
        conn.execute(text("CREATE TABLE evaluation_runs (id INTEGER PRIMARY KEY, job_name "
                          "VARCHAR(64) NOT NULL, kind VARCHAR(16) NOT NULL, trigger VARCHAR(16) "
                          "NOT NULL, state VARCHAR(16) NOT NULL, scheduled_for FLOAT, "
                          "started_at FLOAT NOT NULL, finished_at FLOAT, error TEXT, "
                          "n_images INTEGER, models TEXT, alerts INTEGER NOT NULL)"))
    raw.dispose()
    store = RunStore(db.make_engine(url))
    run_id = store.start_run("ref", "reference", "manual")
    with pytest.raises(EvaluationBusyError):
        store.start_run("ref", "reference", "manual")
    store.fail_run(run_id, "x")
    store.engine.dispose()


def test_close_interrupts_a_background_run(engine: Engine, tmp_path: Path,
                                           refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, refset, FixedAnalyzer(refset.probs, delay_s=0.2))
    run_id = service.trigger_run("ref", "api")
    threading.Event().wait(0.3)
    service.close(timeout=10)
    info = service.wait(run_id, 1)
    assert info is not None and info.state == "failed"
    assert "interrupted" in (info.error or "")
