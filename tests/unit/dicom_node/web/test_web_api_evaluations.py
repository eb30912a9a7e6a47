"""API: evaluation runs, figures, label history, alerts; triggering a run and posting
confirmed labels through the real EvaluationService (503 without one)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from helpers.db_fixtures import ENGINES
from sqlalchemy import select
from webdata import WebEnv

from dicom_node.evaluation.errors import EvaluationBusyError
from dicom_node.evaluation.service import EvaluationService
from dicom_node.store import db

pytest_plugins = ["webfixtures"]


@pytest.fixture(params=ENGINES)
def web_db(request: pytest.FixtureRequest) -> str:
    """The API's reads and writes of this module run on SQLite and on PostgreSQL."""
    return str(request.param)

JOB = "nightly-reference"


def test_runs_list_filters_and_paging(web_env: WebEnv) -> None:
    runs = web_env.data.runs
    page = web_env.get("/api/v1/evaluations/runs").get_json()
    assert page["total"] == 4
    assert [r["id"] for r in page["items"]] == [runs["latest"], runs["failed"], runs["mid"],
                                                runs["old"]]
    failed = web_env.get("/api/v1/evaluations/runs?state=failed").get_json()["items"]
    assert [r["id"] for r in failed] == [runs["failed"]] and "missing" in failed[0]["error"]
    assert web_env.get(f"/api/v1/evaluations/runs?job={JOB}&kind=reference&limit=1"
                       ).get_json()["items"][0]["id"] == runs["latest"]
    assert web_env.get("/api/v1/evaluations/runs?job=other").get_json()["total"] == 0
    assert web_env.get("/api/v1/evaluations/runs?started_to=2000-01-01").get_json()[
        "total"] == 0
    bad = web_env.get("/api/v1/evaluations/runs?state=done")
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "state"


def test_one_run_with_per_label_figures(web_env: WebEnv) -> None:
    run = web_env.get(f"/api/v1/evaluations/runs/{web_env.data.runs['latest']}").get_json()
    assert run["state"] == "succeeded" and run["models"][0]["name"] == "fake-model"
    by_label = {m["label"]: m for m in run["metrics"]}
    nodule = by_label["nodule"]
    assert (nodule["tp"], nodule["fn"], nodule["tn"], nodule["fp"]) == (14, 6, 16, 4)
    assert nodule["sensitivity"] == pytest.approx({"value": 0.7, "ci_lower": 0.58,
                                                   "ci_upper": 0.82})
    assert nodule["roc"][0] == [0.0, 0.0] and nodule["roc"][-1] == [1.0, 1.0]
    assert [a["metric"] for a in run["alert_list"]] == ["sensitivity", "sensitivity"]
    assert web_env.get("/api/v1/evaluations/runs/999").status_code == 404


def test_label_history_over_time(web_env: WebEnv) -> None:
    hist = web_env.get(f"/api/v1/evaluations/labels/nodule/history?job={JOB}").get_json()
    values = [p["sensitivity"]["value"] for p in hist["items"]]
    assert hist["label"] == "nodule" and values == [0.9, 0.85, 0.7]  # oldest first, no failed
    assert hist["items"][0]["started_at"] < hist["items"][-1]["started_at"]
    last = web_env.get("/api/v1/evaluations/labels/nodule/history?limit=1").get_json()
    assert [p["sensitivity"]["value"] for p in last["items"]] == [0.7]
    assert web_env.get("/api/v1/evaluations/labels/unknown/history").get_json()["items"] == []
    assert web_env.get("/api/v1/evaluations/labels/bad%20%3C/history").status_code == 400
    assert web_env.get("/api/v1/evaluations/labels/nodule/history?limit=0").status_code == 400


def test_alerts_and_acknowledge(web_env: WebEnv) -> None:
    alerts = web_env.data.alerts
    active = web_env.get("/api/v1/evaluations/alerts?active=true").get_json()
    assert [a["id"] for a in active["items"]] == [alerts["active"]]
    assert active["items"][0] | {"created_at": None} == {
        "id": alerts["active"], "run_id": web_env.data.runs["latest"], "job_name": JOB,
        "model_name": "fake-model", "label": "nodule", "metric": "sensitivity", "value": 0.7,
        "floor": 0.8, "created_at": None, "acknowledged_at": None, "active": True}
    assert web_env.get("/api/v1/evaluations/alerts?active=false").get_json()["total"] == 1
    assert web_env.get("/api/v1/evaluations/alerts?label=effusion").get_json()["total"] == 0
    assert web_env.get("/api/v1/evaluations/alerts?active=maybe").status_code == 400
    ack = web_env.post(f"/api/v1/evaluations/alerts/{alerts['active']}/acknowledge")
    assert ack.get_json() == {"id": alerts["active"], "acknowledged": True}
    assert web_env.get("/api/v1/evaluations/alerts?active=true").get_json()["total"] == 0
    assert web_env.post(f"/api/v1/evaluations/alerts/{alerts['active']}/acknowledge"
                        ).status_code == 200  # idempotent
    assert web_env.post("/api/v1/evaluations/alerts/999/acknowledge").status_code == 404


def test_evaluation_jobs(web_env: WebEnv) -> None:
    items = {j["job_name"]: j for j in web_env.get("/api/v1/evaluations/jobs").get_json()["items"]}
    assert set(items) == {JOB, "live-confirmed"}
    assert items[JOB]["floors"] == {"nodule": {"sensitivity": 0.8, "specificity": 0.7}}
    assert items[JOB]["runs"] == 4 and items[JOB]["last_run"]["id"] == web_env.data.runs["latest"]
    assert items["live-confirmed"]["last_run"] is None and items["live-confirmed"]["configured"]


def test_trigger_and_confirmed_labels_need_the_service(web_env: WebEnv) -> None:
    for url, body in (("/api/v1/evaluations/runs", {"job": JOB}),
                      ("/api/v1/evaluations/confirmed-labels",
                       {"key_kind": "study", "key_uid": "1.2.3", "labels": {"nodule": 1}})):
        resp = web_env.post(url, json=body)
        assert resp.status_code == 503
        assert resp.get_json()["error"]["code"] == "evaluation_unavailable"


@pytest.fixture
def service(web_env: WebEnv) -> EvaluationService:
    svc = EvaluationService(web_env.engine, web_env.settings)
    web_env.app.extensions["cxr_node"].evaluation = svc
    yield svc
    svc.close()


def test_trigger_a_run(web_env: WebEnv, service: EvaluationService) -> None:
    resp = web_env.post("/api/v1/evaluations/runs", json={"job": JOB})
    assert resp.status_code == 202
    run_id = resp.get_json()["run_id"]
    info = service.wait(run_id, timeout=30)
    assert info is not None and info.state == "failed"  # the reference folder is absent
    run = web_env.get(f"/api/v1/evaluations/runs/{run_id}").get_json()
    assert run["trigger"] == "api" and "does not exist" in run["error"]
    unknown = web_env.post("/api/v1/evaluations/runs", json={"job": "nope"})
    assert unknown.status_code == 404
    assert web_env.post("/api/v1/evaluations/runs", json={}).get_json()["error"]["field"] == "job"
    assert web_env.post("/api/v1/evaluations/runs", json={"job": "../x"}).status_code == 400
    assert web_env.post("/api/v1/evaluations/runs", json=["x"]).status_code == 400
    assert web_env.post("/api/v1/evaluations/runs").status_code == 400


def test_a_busy_job_is_409(web_env: WebEnv, service: EvaluationService,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(job: str) -> int:
        raise EvaluationBusyError(f"evaluation job {job!r} is running", 77)

    monkeypatch.setattr(service, "trigger_run", busy)
    resp = web_env.post("/api/v1/evaluations/runs", json={"job": JOB})
    assert resp.status_code == 409 and "run 77" in resp.get_json()["error"]["message"]


def test_post_confirmed_labels(web_env: WebEnv, service: EvaluationService) -> None:
    body = {"key_kind": "study", "key_uid": web_env.data.done,
            "labels": {"nodule": 1, "effusion": 0}}
    resp = web_env.post("/api/v1/evaluations/confirmed-labels", json=body)
    assert resp.status_code == 201 and resp.get_json()["stored"] == 2
    with web_env.engine.connect() as conn:
        rows = conn.execute(select(db.confirmed_labels)).all()
    assert {(r.key_kind, r.key_uid, r.label, r.value, r.source) for r in rows} == {
        ("study", web_env.data.done, "nodule", 1, "api"),
        ("study", web_env.data.done, "effusion", 0, "api")}


@pytest.mark.parametrize(("body", "field"), [
    ({"key_uid": "1.2", "labels": {"a": 1}}, "key_kind"),
    ({"key_kind": "patient", "key_uid": "1.2", "labels": {"a": 1}}, "key_kind"),
    ({"key_kind": "sop", "key_uid": "Zyx^Canaryweb", "labels": {"a": 1}}, "key_uid"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": {}}, "labels"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": {"a": 2}}, "labels"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": {"a": True}}, "labels"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": {"a": 0.5}}, "labels"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": [1]}, "labels"),
    ({"key_kind": "sop", "key_uid": "1.2", "labels": {"a": 1}, "patient": "x"}, "body"),
])
def test_confirmed_labels_validation(web_env: WebEnv, service: EvaluationService,
                                     body: Mapping[str, object], field: str) -> None:
    resp = web_env.post("/api/v1/evaluations/confirmed-labels", json=body)
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == field
    assert "Canaryweb" not in resp.text


def test_service_rejections_do_not_echo_values(web_env: WebEnv,
                                               service: EvaluationService) -> None:
    body = {"key_kind": "sop", "key_uid": "1.2", "labels": {"Zyx:Canaryweb": 1}}
    resp = web_env.post("/api/v1/evaluations/confirmed-labels", json=body)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "rejected"
    assert "Canaryweb" not in resp.text and "<value>" in resp.text
