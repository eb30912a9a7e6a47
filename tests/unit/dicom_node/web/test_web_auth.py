"""QUALITY 12: every route but the health checks needs the token (state-changing ones too);
the dashboard login sets a signed session cookie and its forms need the CSRF token."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from sqlalchemy import select
from webdata import AUTH, TOKEN, WebEnv, csrf, login, web_settings

from dicom_node import db
from dicom_node.config import WebSettings
from dicom_node.web import create_app
from dicom_node.web.auth import LOGIN_FAILURES_ALLOWED, resolve_token

pytest_plugins = ["webfixtures"]

PUBLIC = {"/healthz", "/readyz", "/dashboard/login", "/static/<path:filename>"}


def concrete(rule: str, env: WebEnv) -> str:
    """A URL for a rule, with ids and UIDs that exist."""
    url = re.sub(r"<int\([^)]*\):\w+>", "1", rule)
    url = url.replace("<study_uid>", env.data.done).replace("<label>", "nodule")
    assert "<" not in url, url
    return url


def routes(env: WebEnv) -> list[tuple[str, str]]:
    out = []
    for rule in env.app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if rule.rule not in PUBLIC:
                out.append((method, concrete(rule.rule, env)))
    return out


def test_every_route_but_health_needs_the_token(web_env: WebEnv) -> None:
    checked = routes(web_env)
    assert len(checked) >= 30
    for method, url in checked:
        anonymous = web_env.client.open(url, method=method)
        if url.startswith("/dashboard") and method == "GET":
            assert anonymous.status_code == 302, url  # to the login form, nothing shown
            assert anonymous.headers["Location"].endswith("/dashboard/login")
        else:
            assert anonymous.status_code == 401, (method, url)
            assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = web_env.client.open(url, method=method,
                                    headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403, (method, url)
        body = wrong.get_json() if not url.startswith("/dashboard") else None
        if body is not None:
            assert body["error"]["code"] == "invalid_token"


def test_state_changing_routes_refused_without_token_change_nothing(web_env: WebEnv) -> None:
    dead = web_env.data.dead_delivery
    for url in (f"/api/v1/deliveries/{dead}/resubmit", "/api/v1/deliveries/resubmit",
                f"/api/v1/studies/{web_env.data.done}/reanalyse",
                f"/dashboard/deliveries/{dead}/resubmit"):
        assert web_env.client.post(url).status_code == 401
        assert web_env.client.post(url, headers={"Authorization": "Bearer x"}).status_code == 403
    with web_env.engine.connect() as conn:
        state = conn.execute(select(db.deliveries.c.state)
                             .where(db.deliveries.c.id == dead)).scalar_one()
        jobs = conn.execute(select(db.jobs)).all()
    assert state == "dead" and len(jobs) == 2


def test_health_checks_are_public(web_env: WebEnv) -> None:
    assert web_env.client.get("/healthz").get_json() == {"status": "ok"}
    ready = web_env.client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["reason"]
    assert web_env.client.get("/dashboard/login").status_code == 200


def test_malformed_authorization_is_401(web_env: WebEnv) -> None:
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", TOKEN):
        resp = web_env.client.get("/api/v1/studies", headers={"Authorization": header})
        assert resp.status_code == 401, header
    assert web_env.client.get("/api/v1/studies", headers=AUTH).status_code == 200


def test_default_bind_is_loopback_and_token_file_private(tmp_path: Path) -> None:
    assert WebSettings().host == "127.0.0.1"
    settings = web_settings(tmp_path / "node", **{"web.token": None})
    settings.storage.data_dir.mkdir(parents=True)
    token = resolve_token(settings)
    path = settings.storage.data_dir / "api-token"
    assert path.read_text().strip() == token and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_token(settings) == token  # stable across restarts


def test_login_sets_a_strict_httponly_session_and_keeps_the_token_out_of_urls(
        web_env: WebEnv) -> None:
    page = web_env.client.get("/dashboard/login").text
    assert 'method="post"' in page and 'type="password"' in page
    resp = login(web_env)
    assert resp.status_code == 302 and resp.headers["Location"] == "/dashboard/"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert TOKEN not in resp.headers["Location"]
    overview = web_env.client.get("/dashboard/")
    assert overview.status_code == 200 and TOKEN not in overview.text
    # the session is for people on the dashboard; machines use the bearer token
    assert web_env.client.get("/api/v1/studies").status_code == 401
    assert web_env.client.get("/metrics").status_code == 401


def test_login_refuses_bad_token_and_missingcsrf(web_env: WebEnv) -> None:
    assert web_env.client.post("/dashboard/login", data={"token": TOKEN}).status_code == 403
    bad = login(web_env, "wrong-token")
    assert bad.status_code == 401 and "Invalid token" in bad.text
    assert web_env.client.get("/dashboard/").status_code == 302


def test_login_attempts_are_throttled(web_env: WebEnv) -> None:
    for _ in range(LOGIN_FAILURES_ALLOWED):
        assert login(web_env, "wrong").status_code == 401
    assert login(web_env, TOKEN).status_code == 429  # even the right one, for a while


def test_dashboard_forms_need_the_csrf_token(web_env: WebEnv) -> None:
    login(web_env)
    dead = web_env.data.dead_delivery
    url = f"/dashboard/deliveries/{dead}/resubmit"
    refused = web_env.client.post(url, data={})
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert web_env.client.post(url, data={"csrf_token": "forged"}).status_code == 403
    page = web_env.client.get("/dashboard/studies/1").text
    ok = web_env.client.post(url, data={"csrf_token": csrf(page)})
    assert ok.status_code == 302
    with web_env.engine.connect() as conn:
        assert conn.execute(select(db.deliveries.c.state)
                            .where(db.deliveries.c.id == dead)).scalar_one() == "pending"


def test_logout_ends_the_session(web_env: WebEnv) -> None:
    login(web_env)
    page = web_env.client.get("/dashboard/").text
    assert web_env.client.post("/dashboard/logout",
                               data={"csrf_token": csrf(page)}).status_code == 302
    assert web_env.client.get("/dashboard/").status_code == 302


def test_a_new_token_ends_existing_sessions(web_env: WebEnv) -> None:
    login(web_env)
    cookie = web_env.client.get_cookie("cxr_session")
    assert cookie is not None
    other = create_app(web_settings(web_env.settings.storage.data_dir,
                                    **{"web.token": "another-token-0123456789"}),
                       engine=web_env.engine, testing=True).test_client()
    other.set_cookie("cxr_session", cookie.value)
    assert other.get("/dashboard/").status_code == 302


@pytest.mark.parametrize("public", [False, True])
def test_metrics_token_can_be_waived_explicitly(web_env: WebEnv, public: bool) -> None:
    class _Web:  # stands in for a future `web.metrics_public` setting
        def __init__(self, inner: WebSettings) -> None:
            self.__dict__.update(inner.__dict__)
            self.metrics_public = public

    ctx = web_env.app.extensions["cxr_node"]
    ctx.settings = ctx.settings.model_copy(update={"web": _Web(ctx.settings.web)})
    assert web_env.client.get("/metrics").status_code == (200 if public else 401)
    assert web_env.client.get("/api/v1/studies").status_code == 401
