"""QUALITY 12: every route but the health checks needs the token (state-changing ones too);
the dashboard login sets a signed session cookie and its forms need the CSRF token."""

from __future__ import annotations

import html
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from webdata import AUTH, TOKEN, WebEnv, csrf, login, web_settings

from dicom_node.config import WebSettings
from dicom_node.store import db
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
            assert urlsplit(anonymous.headers["Location"]).path == "/dashboard/login"
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


BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,"
                     "image/avif,image/webp,*/*;q=0.8"}


def _login_to(env: WebEnv, login_url: str) -> Any:
    """Submit the login form found at ``login_url`` as a browser does (hidden fields too)."""
    page = env.client.get(login_url, headers=BROWSER).text
    fields = {name: html.unescape(value) for name, value in re.findall(
        r'<input type="hidden" name="(\w+)" value="([^"]*)"', page)}
    return env.client.post("/dashboard/login", data={**fields, "token": TOKEN},
                           headers=BROWSER)


def test_a_browser_at_the_root_is_led_to_the_login_and_on_to_the_overview(
        web_env: WebEnv) -> None:
    root = web_env.client.get("/", headers=BROWSER)
    assert root.status_code == 302 and root.headers["Location"] == "/dashboard/login"
    overview = web_env.client.get("/dashboard/", headers=BROWSER)  # the default: no next
    assert overview.headers["Location"] == "/dashboard/login"
    done = _login_to(web_env, root.headers["Location"])
    assert done.status_code == 302 and done.headers["Location"] == "/dashboard/"
    again = web_env.client.get("/", headers=BROWSER)  # with the session: straight on
    assert again.status_code == 302 and again.headers["Location"] == "/dashboard/"
    assert web_env.client.get(again.headers["Location"]).status_code == 200


@pytest.mark.parametrize("accept", [None, "*/*", "application/json",
                                    "application/json, text/html;q=0.5"])
def test_api_clients_at_the_root_keep_json_401s(web_env: WebEnv, accept: str | None) -> None:
    resp = web_env.client.get("/", headers={"Accept": accept} if accept else {})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert web_env.client.get("/", headers=AUTH).headers["Location"] == "/dashboard/"


def test_after_the_login_a_browser_returns_to_the_page_it_asked_for(web_env: WebEnv) -> None:
    asked = "/dashboard/studies?state=done&modality=DX"
    resp = web_env.client.get(asked, headers=BROWSER)
    assert resp.status_code == 302
    location = urlsplit(resp.headers["Location"])
    assert location.path == "/dashboard/login" and parse_qs(location.query)["next"] == [asked]
    done = _login_to(web_env, resp.headers["Location"])
    assert done.status_code == 302 and done.headers["Location"] == asked
    assert web_env.client.get(asked).status_code == 200


@pytest.mark.parametrize("target", [
    "//evil.example/x", "https://evil.example/", "/api/v1/studies", "/dashboard/login",
    "/dashboard/instances/1/image.png", "/dashboard/\\evil.example", "/dashboard/nowhere",
    "/dashboard/logout", "/dashboard/studies\r\nX-Injected: 1", "javascript:alert(1)"])
def test_the_return_address_is_only_ever_a_dashboard_page(web_env: WebEnv,
                                                          target: str) -> None:
    page = web_env.client.get("/dashboard/login", query_string={"next": target}).text
    assert 'name="next"' not in page  # not even carried into the form
    form = web_env.client.get("/dashboard/login").text
    done = web_env.client.post("/dashboard/login", data={
        "token": TOKEN, "csrf_token": csrf(form), "next": target})
    assert done.status_code == 302 and done.headers["Location"] == "/dashboard/"
