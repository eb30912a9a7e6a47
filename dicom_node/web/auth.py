"""Authentication for the API and the dashboard, and CSRF protection.

* Machines: ``Authorization: Bearer <token>`` on every route but ``/healthz`` and
  ``/readyz``. No header: 401 with ``WWW-Authenticate``; a wrong token: 403. A browser
  never attaches this header by itself, so bearer requests need no CSRF token.
* People: ``/dashboard/login`` takes the token once in a POST form and sets a signed,
  HttpOnly, SameSite=Strict session cookie. The token and identifiers never go in a URL.
  A browser without a session (a GET that prefers ``text/html``) asking for ``/`` or a
  dashboard page is redirected to the login, which then returns it to the page it asked
  for (``next``: a dashboard path of this app, nothing else); API clients (no ``Accept``,
  ``*/*`` or JSON) keep getting JSON 401s.
  A session is valid for the dashboard only; its state-changing forms carry a per-session
  CSRF token (checked in constant time), as does the login form itself.
* Failed authentications (wrong or malformed bearer token, wrong dashboard token) are in
  the audit trail with the peer address, never with what was sent.
* The token comes from ``web.token`` or, when that is empty, from ``<data_dir>/api-token``
  (created with 32 random bytes, mode 0600, on first start). The session signing key is
  derived from the token, so changing the token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from dicom_node.audit import AuditKind, Outcome, record_now
from dicom_node.config import Settings
from dicom_node.web.context import web_context
from dicom_node.web.errors import ApiError
from dicom_node.web.validation import query_params

logger = logging.getLogger(__name__)

TOKEN_FILE = "api-token"
PUBLIC_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "auth.login", "static"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_FAILURES_ALLOWED = 10  # per client address and window
LOGIN_WINDOW_S = 300.0
ROOT_ENDPOINT = "root"  # "/": redirects to the dashboard overview
MAX_NEXT_LEN = 2000
NO_RETURN_ENDPOINTS = frozenset({"dashboard.instance_image", "dashboard.output_image",
                                 "dashboard.history_plot", "dashboard.roc_plot"})

bp = Blueprint("auth", __name__)


def resolve_token(settings: Settings) -> str:
    """The configured token, else the one in ``<data_dir>/api-token`` (created once)."""
    if settings.web.token:
        if len(settings.web.token) < 16:
            logger.warning("web.token is shorter than 16 characters; use a long random value")
        return settings.web.token
    path = settings.storage.data_dir / TOKEN_FILE
    token = _read_token(path)
    if token:
        if path.stat().st_mode & 0o077:
            logger.warning("%s is readable by other users; chmod 600 it", path)
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its token
        return _read_token(path) or token
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
    logger.warning("generated a web API token in %s (mode 0600); send it as "
                   "'Authorization: Bearer <token>' or use it to log in", path)
    return token


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None


def session_secret(token: str) -> bytes:
    return hmac.new(token.encode(), b"cxr-node dashboard session v1", hashlib.sha256).digest()


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"fp:" + token.encode()).hexdigest()[:16]


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def csrf_token() -> str:
    """The session's CSRF token (created on first use); templates put it in every form."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def _is_dashboard() -> bool:
    """A dashboard page, the login, or ``/`` (which only redirects to the overview)."""
    blueprint = request.blueprint or ""
    return (blueprint == "auth" or blueprint.startswith("dashboard")
            or request.endpoint == ROOT_ENDPOINT)


def _is_browser() -> bool:
    """The client prefers an HTML page to JSON (a browser; curl's ``*/*`` does not)."""
    return request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html"


def safe_next(raw: str | None) -> str | None:
    """``raw`` when it is a dashboard page of this app to return to after the login, else
    None: never another host, scheme or a route that is not a GET dashboard page."""
    if not raw or len(raw) > MAX_NEXT_LEN or not raw.startswith("/dashboard/"):
        return None
    if "\\" in raw or any(ord(c) < 0x21 or c == "\x7f" for c in raw):
        return None
    path = raw.split("?", 1)[0].split("#", 1)[0]
    try:
        endpoint, _ = current_app.url_map.bind("localhost").match(path, method="GET")
    except HTTPException:
        return None
    if not str(endpoint).startswith("dashboard.") or endpoint in NO_RETURN_ENDPOINTS:
        return None
    return raw


def _to_login() -> Response:
    """Redirect to the login; it sends the browser back to this page afterwards."""
    wanted = request.path + (f"?{request.query_string.decode('latin-1')}"
                             if request.query_string else "")
    if wanted == url_for("dashboard.overview") or safe_next(wanted) is None:
        return redirect(url_for("auth.login"))  # the overview after the login
    return redirect(url_for("auth.login", next=wanted))


def _audit_failure(how: str) -> None:
    """A failed authentication, in the audit trail: the peer address and how, never what
    was sent. A spray of failures from one address is recorded as a count, not row by row
    (each row is a database write the DICOM receiver would have to wait for)."""
    who = request.remote_addr or "?"
    suppressed = current_app.extensions["cxr_audit_limiter"].admit(who)
    if suppressed is None:
        return
    more = f"; {suppressed} more from this address not recorded" if suppressed else ""
    record_now(web_context().engine, AuditKind.LOGIN_FAILED, Outcome.FAILURE, actor="web",
               peer=who, subject=request.url_rule.rule if request.url_rule else None,
               detail=f"{how}{more}")


def _check_csrf() -> None:
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf")
    if not expected or not _equal(sent, str(expected)):
        raise ApiError(403, "missing or invalid CSRF token", code="csrf")


def authenticate() -> Response | None:
    """``before_request``: decide who is asking; public endpoints pass through."""
    ctx = web_context()
    if request.endpoint in PUBLIC_ENDPOINTS or (
            request.endpoint == "metrics.metrics"
            and getattr(ctx.settings.web, "metrics_public", False)):  # an opt-in for scrapers
        return None
    token = ctx.token
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            _audit_failure("malformed Authorization header")
            raise ApiError(401, "use 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": 'Bearer realm="cxr-node"'})
        if not _equal(value.strip(), token):
            _audit_failure("wrong bearer token")
            raise ApiError(403, "invalid token", code="invalid_token")
        g.auth = "bearer"
        return None
    if _is_dashboard() and session.get("auth") and _equal(str(session.get("tfp", "")),
                                                          _fingerprint(token)):
        g.auth = "session"
        if request.method not in SAFE_METHODS:
            _check_csrf()
        return None
    if request.method in SAFE_METHODS and _is_dashboard() and (
            request.endpoint != ROOT_ENDPOINT or _is_browser()):
        return _to_login()
    raise ApiError(401, "authentication required: 'Authorization: Bearer <token>'",
                   headers={"WWW-Authenticate": 'Bearer realm="cxr-node"'})


class AuditLimiter:
    """At most ``per_window`` audited failures per address and window; the rest counted."""

    def __init__(self, per_window: int = 20, window_s: float = 60.0) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int, int]] = {}  # start, recorded, suppressed
        self._lock = threading.Lock()

    def admit(self, who: str) -> int | None:
        """None: do not record; else record, mentioning this many suppressed before."""
        now = time.monotonic()
        with self._lock:
            start, recorded, suppressed = self._seen.get(who, (now, 0, 0))
            if now - start > self.window_s:
                start, recorded = now, 0
            if recorded >= self.per_window:
                self._seen[who] = (start, recorded, suppressed + 1)
                return None
            if len(self._seen) > 10_000:  # bounded memory under a spray of addresses
                self._seen.clear()
            self._seen[who] = (start, recorded + 1, 0)
            return suppressed


class LoginThrottle:
    """Bounded failed-login attempts per client address (a token is long, but still)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, who: str, now: float) -> deque[float]:
        q = self._failures.setdefault(who, deque())
        while q and q[0] < now - LOGIN_WINDOW_S:
            q.popleft()
        return q

    def blocked(self, who: str) -> bool:
        with self._lock:
            return len(self._recent(who, time.monotonic())) >= LOGIN_FAILURES_ALLOWED

    def failed(self, who: str) -> None:
        with self._lock:
            self._recent(who, time.monotonic()).append(time.monotonic())
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures.clear()


def _throttle() -> LoginThrottle:
    return current_app.extensions["cxr_login_throttle"]  # type: ignore[no-any-return]


@bp.route("/dashboard/login", methods=["GET", "POST"])
@query_params("next")
def login() -> Response | str | tuple[str, int]:
    if request.method == "GET":
        return render_template("login.html", error=None,
                               next=safe_next(request.args.get("next")))
    wanted = safe_next(request.form.get("next"))
    who = request.remote_addr or "?"
    if _throttle().blocked(who):
        _audit_failure("dashboard login refused: too many failures")
        raise ApiError(429, "too many failed logins; wait a few minutes")
    _check_csrf()
    if not _equal(request.form.get("token", "").strip(), web_context().token):
        _throttle().failed(who)
        _audit_failure("dashboard login with a wrong token")
        logger.warning("dashboard login failed from %s", who)
        return render_template("login.html", error="Invalid token.", next=wanted), 401
    session.clear()
    session.permanent = True
    session["auth"] = True
    session["tfp"] = _fingerprint(web_context().token)
    session["csrf"] = secrets.token_urlsafe(32)
    logger.info("dashboard login from %s", who)
    return redirect(wanted or url_for("dashboard.overview"))  # type: ignore[return-value]


@bp.route("/dashboard/logout", methods=["POST"])
@query_params()
def logout() -> Response:
    session.clear()
    return redirect(url_for("auth.login"))  # type: ignore[return-value]


def init_auth(app: Flask, token: str) -> None:
    app.secret_key = session_secret(token)
    app.config.update(SESSION_COOKIE_NAME="cxr_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", PERMANENT_SESSION_LIFETIME=8 * 3600)
    app.extensions["cxr_login_throttle"] = LoginThrottle()
    app.extensions["cxr_audit_limiter"] = AuditLimiter()
    app.before_request(authenticate)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.register_blueprint(bp)
