"""Scheduled evaluation with a real APScheduler BackgroundScheduler and 1 s intervals: runs
are stored, floors raise alerts (row, log, webhook on a loopback http.server), failures are
recorded, runs of one job never overlap, and a run missed while the node was down is caught
up once at start-up. Finally the same through a started Node."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until
from helpers.node import node_settings, query, start_node
from sqlalchemy import Engine, insert, select
from unit.dicom_node.evaluation.evalhelpers import (
    FixedAnalyzer,
    ReferenceSet,
    eval_settings,
    make_reference_set,
    reference_job,
)

from dicom_node.evaluation.errors import EvaluationBusyError
from dicom_node.evaluation.service import EvaluationService
from dicom_node.scheduler import EvaluationScheduler, start_evaluation_scheduler
from dicom_node.store import db

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
    yield eng
    eng.dispose()


class Running:
    """A service plus its started scheduler, shut down at the end of the test."""

    def __init__(self) -> None:
        self.schedulers: list[EvaluationScheduler] = []
        self.services: list[EvaluationService] = []

    def start(self, engine: Engine, tmp_path: Path, jobs: list[dict[str, Any]],
              analyzer: FixedAnalyzer, **evaluation: Any) -> EvaluationService:
        service = EvaluationService(engine, eval_settings(tmp_path / "data", jobs, **evaluation),
                                    deployed=lambda: analyzer)
        self.services.append(service)
        scheduler = start_evaluation_scheduler(service, service.config)
        assert scheduler is not None
        self.schedulers.append(scheduler)
        return service

    def stop(self) -> None:
        for service in self.services:
            service.stop_event.set()
        for scheduler in self.schedulers:
            scheduler.shutdown(wait=True)


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    yield r
    r.stop()


def _runs(engine: Engine, job: str = "ref") -> list[Any]:
    t = db.evaluation_runs
    with engine.connect() as conn:
        return conn.execute(select(t).where(t.c.job_name == job).order_by(t.c.id)).all()


def _finished(engine: Engine, n: int = 1, job: str = "ref") -> list[Any]:
    return wait_until(lambda: [r for r in _runs(engine, job) if r.state != "running"][:n]
                      if len([r for r in _runs(engine, job) if r.state != "running"]) >= n
                      else None, timeout=20, what=f"{n} finished run(s)")


def test_interval_run_is_stored_and_breach_raises_alert(
        engine: Engine, tmp_path: Path, refset: ReferenceSet, running: Running,
        caplog: pytest.LogCaptureFixture) -> None:
    job = reference_job(refset, schedule={"interval_s": 1},
                        floors={"nodule": {"sensitivity": 0.8}})
    with caplog.at_level(logging.INFO):
        service = running.start(engine, tmp_path, [job], FixedAnalyzer(refset.probs))
        (run,) = _finished(engine)
    assert (run.state, run.trigger, run.alerts, run.n_images) == ("succeeded", "schedule", 1, 10)
    with engine.connect() as conn:
        metrics = conn.execute(select(db.evaluation_metrics)
                               .where(db.evaluation_metrics.c.run_id == run.id)).all()
        alerts = conn.execute(select(db.evaluation_alerts)).all()
    assert {m.label: (m.tp, m.fp, m.tn, m.fn) for m in metrics}["nodule"] == (3, 2, 4, 1)
    assert [(a.run_id, a.label, a.metric, a.floor) for a in alerts][0] == (
        run.id, "nodule", "sensitivity", 0.8)
    record = next(r for r in caplog.records if "ALERT" in r.getMessage())
    assert record.levelno == logging.WARNING and record.name.startswith("dicom_node.evaluation")
    assert service.list_jobs()[0].next_run_at is not None


def test_failing_scheduled_run_is_recorded(engine: Engine, tmp_path: Path,
                                           refset: ReferenceSet, running: Running) -> None:
    job = reference_job(refset, schedule={"interval_s": 1})
    running.start(engine, tmp_path, [job], FixedAnalyzer(fail_with=OSError("disk gone")))
    (run,) = _finished(engine)
    assert run.state == "failed" and run.error == "OSError: disk gone"
    assert run.finished_at is not None


def test_runs_of_one_job_never_overlap(engine: Engine, tmp_path: Path, refset: ReferenceSet,
                                       running: Running, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    job = reference_job(refset, schedule={"interval_s": 1})
    # 10 studies x 0.15 s: each run takes ~1.5 s against a 1 s interval
    service = running.start(engine, tmp_path, [job], FixedAnalyzer(refset.probs, delay_s=0.15))
    seen_running: list[int] = []
    busy_refused = []
    deadline = time.monotonic() + 5.0  # fires at 1, 2 (skipped), 3, 4 (skipped), 5
    while time.monotonic() < deadline:
        rows = _runs(engine)
        seen_running.append(sum(r.state == "running" for r in rows))
        if seen_running[-1] and not busy_refused:
            with pytest.raises(EvaluationBusyError, match="already running"):
                service.trigger_run("ref", "api")  # the DB guard, on top of max_instances
            busy_refused.append(True)
        time.sleep(0.02)
    running.stop()
    assert max(seen_running) == 1 and busy_refused
    assert len(_runs(engine)) >= 2  # the last one may end "interrupted" by the stop
    assert any(r.state == "succeeded" for r in _runs(engine))
    spans = sorted((r.started_at, r.finished_at) for r in _runs(engine) if r.finished_at)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert "maximum number of running instances reached" in caplog.text


def _old_run(engine: Engine, job: str, started_at: float) -> None:
    with engine.begin() as conn:
        conn.execute(insert(db.evaluation_runs).values(
            job_name=job, kind="reference", trigger="schedule", state="succeeded",
            started_at=started_at, finished_at=started_at + 5, alerts=0))


def test_missed_run_is_caught_up_once_at_start(engine: Engine, tmp_path: Path,
                                               refset: ReferenceSet, running: Running,
                                               caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    jobs = [reference_job(refset, "ref", schedule={"cron": "0 2 * * *"}),
            reference_job(refset, "fresh", schedule={"interval_s": 3600}),
            reference_job(refset, "new", schedule={"cron": "0 2 * * *"})]
    _old_run(engine, "ref", now - 3 * 86400)  # three nightly runs missed while down
    _old_run(engine, "fresh", now - 60)  # hourly, ran a minute ago: nothing missed
    with caplog.at_level(logging.INFO):
        service = running.start(engine, tmp_path, jobs, FixedAnalyzer(refset.probs),
                                timezone="UTC")
        _finished(engine, 2)
        time.sleep(1.0)
    runs = _runs(engine)
    assert [(r.trigger, r.state) for r in runs] == [("schedule", "succeeded"),
                                                    ("catchup", "succeeded")]
    assert runs[1].scheduled_for < now and runs[1].scheduled_for > now - 86400 - 60
    assert "3 scheduled run(s) missed while the node was down" in caplog.text
    assert [r.trigger for r in _runs(engine, "fresh")] == ["schedule"]
    next_run = {j.name: j.next_run_at for j in service.list_jobs()}
    assert next_run["fresh"] == pytest.approx(now - 60 + 3600, abs=1)  # cadence kept
    assert _runs(engine, "new") == []  # never ran: nothing to catch up


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append({"type": self.headers["Content-Type"],
                               "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def test_webhook_posts_alerts_and_a_dead_webhook_is_not_fatal(
        engine: Engine, tmp_path: Path, refset: ReferenceSet,
        caplog: pytest.LogCaptureFixture) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received.clear()
    floors = {"nodule": {"sensitivity": 0.9, "specificity": 0.9}}
    jobs = [reference_job(refset, "hooked", floors=floors,
                          webhook_url=f"http://127.0.0.1:{server.server_port}/alerts"),
            reference_job(refset, "dead", floors=floors,
                          webhook_url=f"http://127.0.0.1:{free_port()}/alerts")]
    service = EvaluationService(engine, eval_settings(tmp_path / "data", jobs,
                                                      webhook_timeout_s=2),
                                deployed=lambda: FixedAnalyzer(refset.probs))
    try:
        run = service.run_now("hooked").run
        with caplog.at_level(logging.WARNING):
            dead = service.run_now("dead").run
    finally:
        server.shutdown()
        server.server_close()
    (hook,) = _Hook.received
    assert hook["type"] == "application/json"
    body = hook["body"]
    assert (body["event"], body["job"], body["run_id"]) == ("evaluation_alert", "hooked", run.id)
    assert sorted(a["metric"] for a in body["alerts"]) == ["sensitivity", "specificity"]
    assert dead.state == "succeeded" and dead.alerts == 2
    assert "evaluation alert webhook failed" in caplog.text


def test_node_runs_its_scheduler_and_watch_folder(tmp_path: Path, refset: ReferenceSet
                                                  ) -> None:
    drop = tmp_path / "confirmed"
    drop.mkdir()
    (drop / "truth.csv").write_text("study_instance_uid,nodule\n1.2.826.0.1.3680043.8.498.5,1\n")
    settings = node_settings(tmp_path / "data", **{
        "evaluation.jobs": [reference_job(refset, schedule={"interval_s": 1})],
        "evaluation.confirmed_watch_dir": str(drop), "evaluation.confirmed_settle_s": 0,
        "evaluation.confirmed_poll_s": 0.5})
    node = start_node(settings, lambda _s: FixedAnalyzer(refset.probs))
    try:
        assert node.scheduler is not None
        run = wait_until(lambda: next((r for r in node.evaluation.list_runs("ref")
                                       if r.state == "succeeded"), None), 20, what="a run")
        assert run.trigger == "schedule" and run.n_images == 10
        wait_until(lambda: list((drop / "processed").glob("*truth.csv")), 10, what="csv")
        assert node.evaluation.list_jobs()[0].next_run_at is not None
    finally:
        node.stop()
    states = [r.state for r in query(settings, select(db.evaluation_runs))]
    assert "running" not in states  # stopped runs end as failed ("interrupted"), not hanging
