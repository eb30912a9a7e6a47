"""Errors at the web edge: every failure becomes a small JSON body, never a stack trace.

``{"error": {"code": "...", "message": "...", "field": "..."}}``; ``field`` names the bad
input when there is one. Messages name fields and constraints but never echo the value a
client sent (it could be a patient identifier). Dashboard pages get the same information
as a plain HTML page. Unexpected exceptions are logged as one line (request path, error
class, incident id; the frames at DEBUG): an exception's message may quote data, so it
stays out of logs and bodies.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "unprocessable", 429: "too_many_requests",
    500: "internal_error", 503: "unavailable",
}
_MESSAGES = {
    400: "the request is malformed", 401: "authentication required",
    403: "forbidden", 404: "no such resource", 405: "method not allowed for this resource",
    413: "request body too large", 415: "unsupported content type",
    429: "too many requests", 500: "internal error", 503: "service unavailable",
}


class ApiError(Exception):
    """An error the client can act on; raised by routes, rendered by the handlers below."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.field = field
        self.headers = headers or {}


def bad_request(field: str, message: str) -> ApiError:
    """A 400 naming the field, e.g. ``bad_request("limit", "must be an integer 1..500")``."""
    return ApiError(400, f"{field}: {message}", code="invalid_parameter", field=field)


def _wants_html() -> bool:
    return request.path.startswith("/dashboard")


def error_response(err: ApiError) -> Response:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.field:
        body["field"] = err.field
    if _wants_html():
        resp = Response(render_template("error.html", status=err.status, error=body),
                        status=err.status, mimetype="text/html")
    else:
        resp = jsonify({"error": body})
        resp.status_code = err.status
    for name, value in err.headers.items():
        resp.headers[name] = value
    return resp


def _from_http(exc: HTTPException) -> ApiError:
    status = exc.code or 500
    headers = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(sorted(exc.valid_methods or []))
    # Werkzeug's own descriptions never contain request data, but keep ours short and fixed.
    return ApiError(status, _MESSAGES.get(status, "request failed"), headers=headers)


def _unexpected(exc: Exception) -> Response:
    """One ERROR line per failed request (method, path, error class, incident); the frames
    only at DEBUG. The path holds internal ids and UIDs, never the query string."""
    incident = uuid.uuid4().hex[:12]
    logger.error("%s %s failed: %s (incident %s)", request.method, request.path,
                 type(exc).__name__, incident)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("incident %s frames:\n%s", incident,
                     "".join(traceback.format_tb(exc.__traceback__)))
    return error_response(ApiError(500, f"internal error (incident {incident} is in the "
                                   "node log)"))


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, lambda exc: error_response(_from_http(exc)))
    app.register_error_handler(Exception, _unexpected)
