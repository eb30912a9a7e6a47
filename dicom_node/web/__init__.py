"""The node's web application: JSON API, Prometheus metrics and the dashboard (Flask).

:func:`create_app` builds the app from the settings and its collaborators (the running
node, or just a database engine for tests and tools, and the evaluation service);
:mod:`dicom_node.web.server` runs it in the node process on ``web.host:web.port``
(127.0.0.1:8080 by default). Route map (every route but the health checks needs the
token, see :mod:`dicom_node.web.auth`; all of them are described in ``openapi.yaml``):

=========================================  ==================================================
``/healthz``, ``/readyz``                  liveness; readiness (listener up, model loaded)
``/metrics``                               Prometheus text format
``/api/v1/studies[/<uid>[/reanalyse]]``    studies, one study with everything, re-analysis
``/api/v1/jobs[/<id>]``                    analysis jobs
``/api/v1/deliveries[...]``                deliveries, resubmit one or all dead
``/api/v1/models``                         loaded model bundles, labels, thresholds
``/api/v1/evaluations/...``                runs, figures, label history, alerts, trigger,
                                           confirmed labels
``/api/v1/audit``                          the audit trail (filters kind, outcome, time)
``/api/v1/openapi.yaml``                   the OpenAPI 3 document
``/dashboard/...``                         login, overview, studies, study, evaluation,
                                           audit
=========================================  ==================================================
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from flask import Flask, Response, redirect, url_for
from sqlalchemy import Engine

from dicom_node.config import Settings
from dicom_node.spool import Spool
from dicom_node.web.context import EXTENSION_KEY, EvaluationService, WebContext

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

__all__ = ["EvaluationService", "create_app"]


def _dt(value: str | None) -> str:
    """ISO 8601 UTC -> local time of the node, to the second."""
    if not value:
        return ""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone().strftime(
        "%Y-%m-%d %H:%M:%S")


def _da(value: str | None) -> str:
    """DICOM DA (YYYYMMDD) -> YYYY-MM-DD."""
    text = (value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100.0 * value:.1f} %"


def _security_headers(resp: Response) -> Response:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; img-src 'self'; style-src 'self'; "
                            "script-src 'none'; frame-ancestors 'none'; form-action 'self'")
    resp.headers.setdefault("Cache-Control", "no-store")  # pages and images carry PHI
    return resp


def create_app(settings: Settings, node: Any | None = None, *, engine: Engine | None = None,
               evaluation: EvaluationService | None = None,
               testing: bool = False) -> Flask:
    """Build the web app.

    Args:
        settings: the node settings (``web`` section, data directory, destinations, ...).
        node: the running :class:`dicom_node.service.Node`, for readiness, the models, its
            engine and spool and, when ``evaluation`` is None, its ``evaluation`` attribute
            (read at request time, so a service wired after the app was built is found).
        engine: the database when there is no node (tests, tools); default: a new engine
            on ``settings.database_url``.
        evaluation: the evaluation service (``trigger_run``, ``post_confirmed_labels``);
            without one those two routes answer 503.
        testing: Flask's testing mode (exceptions still become JSON 500s).
    """
    from dicom_node.store.db import make_engine
    from dicom_node.web import (
        api_evaluations,
        api_meta,
        api_studies,
        audit,
        auth,
        dashboard,
        health,
        metrics,
    )
    from dicom_node.web.errors import register_error_handlers
    from dicom_node.web.validation import query_params

    if node is not None:
        engine, spool = node.engine, node.spool
    else:
        engine = engine or make_engine(settings.database_url)
        spool = Spool(settings.storage.data_dir / "spool")
    token = auth.resolve_token(settings)
    app = Flask(__name__)
    app.config.update(TESTING=testing, MAX_CONTENT_LENGTH=settings.web.max_request_body_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented order
    app.extensions[EXTENSION_KEY] = WebContext(settings=settings, engine=engine, spool=spool,
                                               token=token, node=node, evaluation=evaluation)
    auth.init_auth(app, token)
    register_error_handlers(app)
    for bp in (health.bp, metrics.bp, api_studies.bp, api_evaluations.bp, api_meta.bp,
               audit.api_bp, dashboard.bp, audit.page_bp):
        app.register_blueprint(bp)
    app.add_url_rule("/", auth.ROOT_ENDPOINT, query_params()(lambda: redirect(url_for(
        "dashboard.overview"))))  # a browser without a session goes to the login first
    app.after_request(_security_headers)
    app.jinja_env.filters.update(dt=_dt, da=_da, pct=_pct)
    app.jinja_env.autoescape = True
    return app
