"""The audit trail through the web: failed logins are recorded (peer, never the token), the
API filters and pages, the dashboard page shows and filters the events."""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from webdata import AUTH, TOKEN, WebEnv, login

from dicom_node.audit import AuditKind, Outcome, record
from dicom_node.store import db
from dicom_node.web.auth import AuditLimiter

pytest_plugins = ["webfixtures"]

WRONG = "wrong-token-CANARYTOKEN-77"


def events(env: WebEnv, kind: str | None = None) -> list:  # type: ignore[type-arg]
    q = select(db.audit_events).order_by(db.audit_events.c.id)
    if kind:
        q = q.where(db.audit_events.c.kind == kind)
    with env.engine.connect() as conn:
        return list(conn.execute(q).all())


def all_text(env: WebEnv) -> str:
    return " ".join(str(v) for r in events(env) for v in r)


def test_failed_dashboard_login_is_audited_without_the_token(web_env: WebEnv) -> None:
    assert login(web_env, WRONG).status_code == 401
    rows = events(web_env, "login_failed")
    assert len(rows) == 1
    row = rows[0]
    assert (row.outcome, row.actor, row.peer) == ("failure", "web", "127.0.0.1")
    assert row.subject == "/dashboard/login" and "wrong token" in row.detail
    assert "CANARYTOKEN" not in all_text(web_env) and TOKEN not in all_text(web_env)
    assert login(web_env).status_code == 302  # the right token: no new failure
    assert len(events(web_env, "login_failed")) == 1


def test_bad_and_malformed_bearer_tokens_are_audited(web_env: WebEnv) -> None:
    bad = web_env.client.get("/api/v1/studies", headers={"Authorization": f"Bearer {WRONG}"},
                             environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert bad.status_code == 403
    odd = web_env.client.get("/metrics", headers={"Authorization": f"Basic {WRONG}"})
    assert odd.status_code == 401
    assert web_env.client.get("/api/v1/studies").status_code == 401  # no credentials: no event
    rows = events(web_env, "login_failed")
    assert [(r.peer, r.subject, r.detail) for r in rows] == [
        ("10.1.2.3", "/api/v1/studies", "wrong bearer token"),
        ("127.0.0.1", "/metrics", "malformed Authorization header")]
    assert "CANARYTOKEN" not in all_text(web_env)


def test_a_spray_of_failures_is_counted_not_written_row_by_row(web_env: WebEnv) -> None:
    for _ in range(30):
        web_env.client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {WRONG}"})
    assert len(events(web_env, "login_failed")) == 20
    limiter = AuditLimiter(per_window=2, window_s=0.05)
    assert [limiter.admit("a") for _ in range(4)] == [0, 0, None, None]
    assert limiter.admit("b") == 0  # per address
    time.sleep(0.06)  # the window passes (a unit of the limiter, not a wait on the app)
    assert limiter.admit("a") == 2 and limiter.admit("a") == 0


def _seed(env: WebEnv) -> None:
    with env.engine.begin() as conn:
        conn.execute(delete(db.audit_events))
        for i in range(12):
            record(conn, AuditKind.ASSOCIATION_ACCEPTED if i % 3 else AuditKind.LOGIN_FAILED,
                   Outcome.SUCCESS if i % 3 else Outcome.FAILURE, actor=f"AE{i}",
                   peer="127.0.0.1", subject=f"1.2.3.{i}", detail=f"event {i}",
                   at=1_700_000_000 + i * 3600)


def test_api_filters_and_pages(web_env: WebEnv) -> None:
    _seed(web_env)
    page = web_env.get("/api/v1/audit?limit=5").get_json()
    assert page["total"] == 12 and page["limit"] == 5 and page["offset"] == 0
    assert [e["detail"] for e in page["items"]] == [f"event {i}" for i in (11, 10, 9, 8, 7)]
    assert page["items"][0]["at"] == "2023-11-15T09:13:20.000Z"
    second = web_env.get("/api/v1/audit?limit=5&offset=10").get_json()
    assert [e["detail"] for e in second["items"]] == ["event 1", "event 0"]
    failed = web_env.get("/api/v1/audit?kind=login_failed").get_json()
    assert failed["total"] == 4 and {e["outcome"] for e in failed["items"]} == {"failure"}
    assert web_env.get("/api/v1/audit?outcome=success").get_json()["total"] == 8
    window = web_env.get("/api/v1/audit?since=1700007200&until=2023-11-15T01:13:20Z")
    assert [e["detail"] for e in window.get_json()["items"]] == ["event 3", "event 2"]
    for bad in ("kind=nope", "outcome=maybe", "since=yesterday", "limit=0", "colour=red"):
        resp = web_env.get(f"/api/v1/audit?{bad}")
        assert resp.status_code == 400, bad
        assert resp.get_json()["error"]["code"] == "invalid_parameter"
    assert web_env.client.get("/api/v1/audit").status_code == 401


def test_dashboard_page_lists_and_filters_by_kind(web_env: WebEnv) -> None:
    _seed(web_env)
    login(web_env)
    page = web_env.client.get("/dashboard/audit").text
    assert 'id="audit-events"' in page and "event 11" in page and "association accepted" in page
    assert 'href="/dashboard/audit"' in page  # in the navigation
    only = web_env.client.get("/dashboard/audit?kind=login_failed&outcome=&since=&until=").text
    assert "event 9" in only and "event 11" not in only and "association accepted</td>" not in only
    assert web_env.client.get("/dashboard/audit?kind=bogus").status_code == 400
    anonymous = web_env.app.test_client().get("/dashboard/audit")
    assert anonymous.status_code == 302 and anonymous.headers["Location"].endswith("/login")
    assert web_env.app.test_client().get("/dashboard/audit", headers=AUTH).status_code == 200
