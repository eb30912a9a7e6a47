"""API: studies, jobs and deliveries: filters, paging, error bodies, and the effects of
resubmit and re-analyse in the database."""

from __future__ import annotations

import time

import pytest
from helpers.db_fixtures import ENGINES
from helpers.fakes import FakeAnalyzer
from sqlalchemy import func, select
from webdata import DEST, WebEnv

from dicom_node.config import Destination
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.worker import AnalysisWorker

pytest_plugins = ["webfixtures"]


@pytest.fixture(params=ENGINES)
def web_db(request: pytest.FixtureRequest) -> str:
    """The API's reads and writes of this module run on SQLite and on PostgreSQL."""
    return str(request.param)


def uids(resp: object) -> set[str]:
    return {s["study_uid"] for s in resp.get_json()["items"]}  # type: ignore[attr-defined]


def test_studies_list_filters(web_env: WebEnv) -> None:
    d = web_env.data
    all_ = web_env.get("/api/v1/studies").get_json()
    assert all_["total"] == 4 and all_["limit"] == 50 and all_["offset"] == 0
    assert uids(web_env.get("/api/v1/studies?state=done")) == {d.done}
    assert uids(web_env.get("/api/v1/studies?state=failed")) == {d.failed}
    assert uids(web_env.get("/api/v1/studies?modality=ct")) == {d.ignored}
    assert uids(web_env.get("/api/v1/studies?received_from=2000-01-01")) == {
        d.done, d.ignored, d.failed, d.receiving}
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    assert web_env.get(f"/api/v1/studies?received_from={tomorrow}").get_json()["total"] == 0
    assert uids(web_env.get("/api/v1/studies?received_to=946684800")) == set()


def test_studies_status_words(web_env: WebEnv) -> None:
    items = {s["study_uid"]: s for s in web_env.get("/api/v1/studies").get_json()["items"]}
    d = web_env.data
    assert items[d.done]["status"] == "dead_letter"  # one delivery is dead
    assert items[d.done]["deliveries"] == {"pending": 0, "sending": 0, "sent": 1,
                                           "committed": 0, "not_accepted": 1, "retrying": 1,
                                           "dead": 1}
    assert items[d.done]["positive_findings"] == 2
    assert items[d.ignored]["status"] == "ignored" and "not a projection" in items[
        d.ignored]["reason"]
    assert items[d.receiving]["status"] == "received"


def test_studies_paging_is_stable_and_complete(web_env: WebEnv) -> None:
    seen: list[str] = []
    for offset in range(0, 4, 3):
        page = web_env.get(f"/api/v1/studies?limit=3&offset={offset}").get_json()
        assert page["total"] == 4 and page["limit"] == 3 and page["offset"] == offset
        seen += [s["study_uid"] for s in page["items"]]
    assert len(seen) == 4 and len(set(seen)) == 4
    assert web_env.get("/api/v1/studies?offset=100").get_json()["items"] == []


@pytest.mark.parametrize(("query", "field"), [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"), ("offset=-1", "offset"),
    ("state=sent", "state"), ("received_from=yesterday", "received_from"),
    ("received_to=", "received_to"), ("unknown=1", "query"),
    ("modality=%3Cscript%3E", "modality"), ("received_to=2026-13-45", "received_to"),
])
def test_bad_query_parameters_are_400_naming_the_field(web_env: WebEnv, query: str,
                                                       field: str) -> None:
    resp = web_env.get(f"/api/v1/studies?{query}")
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["field"] == field and error["message"].startswith(field)
    assert "<script>" not in resp.text  # values are never echoed


def test_one_study_with_everything(web_env: WebEnv) -> None:
    study = web_env.get(f"/api/v1/studies/{web_env.data.done}").get_json()
    assert study["state"] == "done" and len(study["instance_list"]) == 2
    assert {i["state"] for i in study["instance_list"]} == {"analysed"}
    assert study["current_job_id"] == study["jobs"][-1]["id"]
    [f1, f2] = study["findings"]
    assert f1["label"] == "nodule" and f1["probability"] == 0.9 and f1["threshold"] == 0.5
    assert f1["positive"] and len(f1["box"]) == 4 and f1["code"]["value"] == "27925004"
    assert sorted(o["kind"] for o in study["outputs"]) == ["gsps", "sc", "sc", "sr"]
    assert all(len(o["deliveries"]) == 1 for o in study["outputs"])
    assert study["deliveries_by_destination"] == {DEST: {
        "pending": 0, "sending": 0, "sent": 1, "committed": 0, "not_accepted": 1,
        "retrying": 1, "dead": 1}}
    ignored = web_env.get(f"/api/v1/studies/{web_env.data.ignored}").get_json()
    assert ignored["instance_list"][0]["state"] == "ignored"
    assert ignored["instance_list"][0]["reason"].startswith("SOP class")


def test_study_errors(web_env: WebEnv) -> None:
    missing = web_env.get("/api/v1/studies/1.2.3.4")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": {"code": "not_found", "message": "study not found"}}
    bad = web_env.get("/api/v1/studies/not-a-uid")
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "study_uid"


def test_recorded_errors_are_redacted(web_env: WebEnv) -> None:
    study = web_env.get(f"/api/v1/studies/{web_env.data.failed}").get_json()
    assert study["state"] == "failed"
    assert study["jobs"][0]["error"] == ("AnalysisError: model exploded on [redacted] / "
                                         "[redacted]")
    assert "[redacted]" in study["reason"]
    jobs = web_env.get("/api/v1/jobs?state=failed").get_json()
    assert jobs["total"] == 1 and "[redacted]" in jobs["items"][0]["error"]


def test_jobs(web_env: WebEnv) -> None:
    page = web_env.get("/api/v1/jobs").get_json()
    assert page["total"] == 2 and [j["id"] for j in page["items"]] == [2, 1]
    assert web_env.get(f"/api/v1/jobs?study_uid={web_env.data.done}").get_json()["total"] == 1
    assert web_env.get("/api/v1/jobs?state=queued").get_json()["total"] == 0
    assert web_env.get("/api/v1/jobs?created_to=2000-01-01").get_json()["total"] == 0
    job = web_env.get("/api/v1/jobs/1").get_json()
    assert job["state"] == "done" and len(job["instances"]) == 2 and len(job["findings"]) == 2
    assert job["duration_s"] > 0
    assert web_env.get("/api/v1/jobs/999").status_code == 404
    assert web_env.get("/api/v1/jobs/0").status_code == 404
    assert web_env.get("/api/v1/jobs/99999999999999999999").status_code == 404
    assert web_env.get("/api/v1/jobs?study_uid=x").get_json()["error"]["field"] == "study_uid"


def test_deliveries_list(web_env: WebEnv) -> None:
    page = web_env.get("/api/v1/deliveries").get_json()
    assert page["total"] == 4 and {d["kind"] for d in page["items"]} == {"sr", "sc", "gsps"}
    dead = web_env.get("/api/v1/deliveries?state=dead").get_json()["items"]
    assert [d["id"] for d in dead] == [web_env.data.dead_delivery]
    assert dead[0]["last_error"] and dead[0]["study_uid"] == web_env.data.done
    assert web_env.get(f"/api/v1/deliveries?destination={DEST}").get_json()["total"] == 4
    [refused] = web_env.get("/api/v1/deliveries?state=not_accepted").get_json()["items"]
    assert refused["id"] == web_env.data.not_accepted_delivery
    assert refused["last_error"] == f"not accepted by {DEST}: Comprehensive SR Storage"
    [retrying] = web_env.get("/api/v1/deliveries?state=retrying").get_json()["items"]
    assert retrying["last_status"] == 0xA700 and retrying["attempts"] == 1
    [sent] = web_env.get("/api/v1/deliveries?state=sent").get_json()["items"]
    assert sent["transfer_syntax"] == "1.2.840.10008.1.2.5" and sent["committed_at"] is None
    bad = web_env.get("/api/v1/deliveries?state=stuck")
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "state"
    assert web_env.get("/api/v1/deliveries?destination=X@h:1").get_json()["total"] == 0


def _delivery(env: WebEnv, delivery_id: int) -> object:
    with env.engine.connect() as conn:
        return conn.execute(select(db.deliveries).where(db.deliveries.c.id == delivery_id)).one()


def test_resubmit_one_dead_delivery(web_env: WebEnv) -> None:
    dead = web_env.data.dead_delivery
    resp = web_env.post(f"/api/v1/deliveries/{dead}/resubmit")
    assert resp.status_code == 200 and resp.get_json() == {"resubmitted": 1}
    row = _delivery(web_env, dead)
    assert row.state == "pending" and row.attempts == 0 and row.last_error is None  # type: ignore[attr-defined]
    again = web_env.post(f"/api/v1/deliveries/{dead}/resubmit")
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "invalid_state"
    sent = web_env.post(f"/api/v1/deliveries/{web_env.data.sent_delivery}/resubmit")
    assert sent.status_code == 409 and "delivery is sent" in sent.get_json()["error"]["message"]
    refused = web_env.post(f"/api/v1/deliveries/{web_env.data.not_accepted_delivery}/resubmit")
    assert refused.status_code == 200  # e.g. once the PACS takes Comprehensive SR
    assert _delivery(web_env, web_env.data.not_accepted_delivery).state == "pending"  # type: ignore[attr-defined]
    with web_env.engine.connect() as conn:
        events = conn.execute(select(db.audit_events).where(
            db.audit_events.c.kind == "resubmitted")).all()
    assert [(e.actor, e.detail.endswith(w)) for e, w in zip(
        events, ("was dead", "was not_accepted"), strict=True)] == [("api", True)] * 2
    assert web_env.post("/api/v1/deliveries/12345/resubmit").status_code == 404


def test_resubmit_all_dead(web_env: WebEnv) -> None:
    assert web_env.post("/api/v1/deliveries/resubmit",
                        json={"destination": "NOPE@h:104"}).get_json() == {"resubmitted": 0}
    for bad in (None, "", 7, "x" * 129):
        resp = web_env.post("/api/v1/deliveries/resubmit", json={"destination": bad})
        assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "destination"
    extra = web_env.post("/api/v1/deliveries/resubmit", json={"destination": DEST, "all": 1})
    assert extra.status_code == 400 and extra.get_json()["error"]["field"] == "body"
    assert web_env.post("/api/v1/deliveries/resubmit", data="destination=x",
                        content_type="text/plain").status_code == 415
    resp = web_env.post("/api/v1/deliveries/resubmit", json={"destination": DEST})
    assert resp.get_json() == {"resubmitted": 2}  # the dead one and the not accepted one
    assert web_env.post("/api/v1/deliveries/resubmit").get_json() == {"resubmitted": 0}
    assert _delivery(web_env, web_env.data.dead_delivery).state == "pending"  # type: ignore[attr-defined]


def _counts(env: WebEnv) -> tuple[int, int, int]:
    with env.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()  # type: ignore[return-value]
                     for t in (db.jobs, db.outputs, db.deliveries))


def test_reanalyse_same_model_rebuilds_the_same_objects_and_sends_nothing_twice(
        web_env: WebEnv) -> None:
    uid = web_env.data.done
    with web_env.engine.connect() as conn:
        before = {o.sop_instance_uid for o in conn.execute(select(db.outputs)).all()}
    jobs, outputs, deliveries = _counts(web_env)
    resp = web_env.post(f"/api/v1/studies/{uid}/reanalyse")
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["instances"] == 2 and body["state"] == "queued" and body["job_id"] == jobs + 1
    assert "same UIDs" in body["policy"]
    conflict = web_env.post(f"/api/v1/studies/{uid}/reanalyse")
    assert conflict.status_code == 409  # a job is queued already
    with web_env.engine.connect() as conn:
        states = {r.analysis_state for r in conn.execute(
            select(db.instances).where(db.instances.c.study_uid == uid)).all()}
    assert states == {"selected"}
    spool = Spool(web_env.settings.storage.data_dir / "spool")
    worker = AnalysisWorker(web_env.engine, spool, JobQueue(web_env.engine, lease_s=60,
                                                            max_attempts=1),
                            FakeAnalyzer(), OutputSettings(), [Destination.parse(DEST)])
    assert worker.process_one("test").state == "done"  # type: ignore[union-attr]
    with web_env.engine.connect() as conn:
        after = {o.sop_instance_uid for o in conn.execute(select(db.outputs)).all()}
    assert after == before
    assert _counts(web_env) == (jobs + 1, outputs, deliveries)
    study = web_env.get(f"/api/v1/studies/{uid}").get_json()
    assert study["state"] == "done" and study["current_job_id"] == body["job_id"]


def test_reanalyse_applies_the_current_selection_rules(web_env: WebEnv) -> None:
    resp = web_env.post(f"/api/v1/studies/{web_env.data.ignored}/reanalyse")
    assert resp.status_code == 202
    assert resp.get_json()["job_id"] is None and resp.get_json()["state"] == "ignored"


def test_reanalyse_errors(web_env: WebEnv) -> None:
    assert web_env.post("/api/v1/studies/1.2.3/reanalyse").status_code == 404
    busy = web_env.post(f"/api/v1/studies/{web_env.data.receiving}/reanalyse")
    assert busy.status_code == 409 and "receiving" in busy.get_json()["error"]["message"]
    assert web_env.post(f"/api/v1/studies/{web_env.data.done}/reanalyse",
                        json={"force": True}).get_json()["error"]["field"] == "body"
    assert web_env.post("/api/v1/studies/abc/reanalyse").status_code == 400
