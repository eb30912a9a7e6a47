"""Request input: query parameters, path UIDs and JSON bodies, checked with 400s that
name the field (and never echo the value)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from flask import g, request

from ai.uids import is_valid_uid
from dicom_node.web.errors import ApiError, bad_request

F = TypeVar("F", bound=Callable[..., Any])
MAX_LIMIT = 500
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:@+/-]{0,127}$")


def arg(name: str) -> str | None:
    """A query parameter; present but empty is a 400 (an empty filter is a client bug)."""
    raw = request.args.get(name)
    if raw == "":
        if name in g.get("empty_means_absent", ()):
            return None
        raise bad_request(name, "must not be empty (leave the parameter out instead)")
    return raw


def text_arg(name: str, max_len: int = 128) -> str | None:
    """Free text used only as an equality filter (never echoed, never a path)."""
    raw = arg(name)
    if raw is not None and len(raw) > max_len:
        raise bad_request(name, f"must be at most {max_len} characters")
    return raw


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = arg(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?\d{1,12}", raw.strip()):
        raise bad_request(name, f"must be an integer between {lo} and {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_request(name, f"must be an integer between {lo} and {hi}")
    return value


def page_args(default_limit: int = 50) -> Page:
    limit = int_arg("limit", default_limit, 1, MAX_LIMIT)
    offset = int_arg("offset", 0, 0, 10**9)
    assert limit is not None and offset is not None
    return Page(limit, offset)


def enum_arg(name: str, choices: tuple[str, ...]) -> str | None:
    raw = arg(name)
    if raw is None:
        return None
    if raw not in choices:
        raise bad_request(name, f"must be one of {', '.join(choices)}")
    return raw


def bool_arg(name: str) -> bool | None:
    raw = arg(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise bad_request(name, "must be true or false")


def parse_time(raw: str, name: str) -> float:
    """ISO 8601 date or date-time (naive = UTC), or UNIX seconds -> UNIX seconds."""
    text = raw.strip()
    try:
        if re.fullmatch(r"\d{1,12}(\.\d{1,9})?", text):
            return float(text)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(),
                                    UTC).timestamp()
        parsed = datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", text))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError):
        raise bad_request(name, "must be an ISO 8601 date or date-time, or UNIX seconds") from None


def time_arg(name: str) -> float | None:
    raw = arg(name)
    if raw is None:
        return None
    return parse_time(raw, name)


def name_arg(name: str, max_len: int = 128) -> str | None:
    """A configuration name (job, label, model, destination): printable, bounded."""
    raw = arg(name)
    if raw is None:
        return None
    return check_name(raw, name, max_len)


def check_name(value: Any, name: str, max_len: int = 128) -> str:
    if not isinstance(value, str) or len(value) > max_len or not _NAME_RE.match(value):
        raise bad_request(name, f"must be 1-{max_len} letters, digits or ' _.:@+/-'")
    return value


_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as evaluation job names


def job_arg(name: str = "job") -> str | None:
    """An evaluation job name, with the same rule the configuration applies."""
    raw = arg(name)
    if raw is None:
        return None
    if not _JOB_RE.match(raw):
        raise bad_request(name, "must be 1-64 letters, digits or '_.-', starting alphanumeric")
    return raw


def uid_arg(name: str) -> str | None:
    raw = arg(name)
    if raw is None:
        return None
    return check_uid(raw, name)


def check_uid(value: Any, name: str) -> str:
    if not is_valid_uid(value):
        raise bad_request(name, "must be a DICOM UID (digits and dots, at most 64 characters)")
    return value


def time_range(lo_name: str, hi_name: str) -> tuple[float | None, float | None]:
    """Both ends of a time filter; an empty range (``to`` before ``from``) is no error."""
    return time_arg(lo_name), time_arg(hi_name)


def query_params(*allowed: str) -> Callable[[F], F]:
    """Route decorator: a query parameter the route does not know is a 400 (a typo would
    otherwise silently widen a filter). The unknown name is not echoed."""
    names = frozenset(allowed)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if any(k not in names for k in request.args):
                listed = ", ".join(allowed) if allowed else "none"
                raise ApiError(400, f"query: unknown parameter; allowed: {listed}",
                               code="invalid_parameter", field="query")
            return view(*args, **kwargs)
        return checked  # type: ignore[return-value]
    return decorate


def json_body(*, required: bool) -> dict[str, Any]:
    """The JSON object body; an absent body is ``{}`` unless ``required``."""
    if not request.get_data(cache=True):
        if required:
            raise ApiError(400, "a JSON object body is required", code="invalid_body")
        return {}
    if not request.is_json:
        raise ApiError(415, "Content-Type must be application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_body")
    return body


def reject_unknown(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Unknown keys are refused; the key itself is not echoed (a client could have put
    anything there), the allowed ones are listed instead."""
    if any(k not in allowed for k in body):
        listed = ", ".join(allowed) if allowed else "none"
        raise ApiError(400, f"body: unknown field; allowed fields: {listed}",
                       code="invalid_parameter", field="body")
