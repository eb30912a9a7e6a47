"""STOW-RS (DICOMweb Store, PS3.18 10.5): the request, and what its response means for the
object sent.

One object per request: an HTTP-level answer (401, 415, 503, a timeout) then is exactly
that object's outcome, one bad object cannot fail its study's others, a retry re-sends only
what failed, and a request never holds more than one result file (a secondary capture of a
large radiograph is tens of MB). The cost, three requests per study instead of one, is
small on a kept-alive connection.

The stored Part 10 file goes out unchanged (``multipart/related; type="application/dicom"``,
its transfer syntax as written); the response (``application/dicom+json``) lists the
object in the Referenced SOP Sequence (0008,1199), with a Warning Reason (0008,1196) when
the server coerced it, or in the Failed SOP Sequence (0008,1198) with a Failure Reason
(0008,1197). Those reasons are DIMSE status codes and are classified like C-STORE statuses
(:func:`dicom_node.delivery.outcome.from_status`). Error texts carry the HTTP status and
reason phrase only: never credentials, never the response body (which could echo data).
"""

from __future__ import annotations

import json
import uuid
from http import HTTPStatus

import requests
from pydicom.dataset import Dataset

from dicom_node.config import StowRsDestination
from dicom_node.delivery.outcome import Outcome, Verdict, from_status

DICOM_JSON = "application/dicom+json"
# PS3.18 Table 10.5.3-3 adds to the C-STORE codes: the server does not take the transfer
# syntax; the node has no other encoding of the file to offer, so this is terminal.
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

_DEAD_HTTP = {400, 401, 403, 404, 405, 406, 410, 411, 413, 414, 422}
_NOT_ACCEPTED_HTTP = {415}
_BUSY_HTTP = {429, 503}
_RESPONSE_WITH_OBJECTS = {200, 202, 409}
_HINTS = {401: "check the destination's auth (user name, token or password variable)",
          403: "the server refuses this user", 404: "check the DICOMweb root url",
          413: "the server refuses an object this large"}


def multipart_related(parts: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """The body and Content-Type of a STOW-RS request holding ``parts`` (Part 10 files).

    The boundary is random; one that occurs inside a part (RFC 2046 5.1.1) is refused."""
    boundary = boundary or f"cxr-{uuid.uuid4().hex}"
    if any(f"--{boundary}".encode() in part for part in parts):
        raise ValueError(f"multipart boundary {boundary!r} occurs inside a part")
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                   part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return (b"".join(chunks),
            f'multipart/related; type="application/dicom"; boundary={boundary}')


def post(session: requests.Session, dest: StowRsDestination, part10: bytes
         ) -> requests.Response:
    """POST one object to ``<url>/studies``; raises what ``requests`` raises."""
    body, content_type = multipart_related([part10])
    return session.post(dest.stow_url, data=body, timeout=dest.timeout_s,
                        headers={"Content-Type": content_type, "Accept": DICOM_JSON,
                                 **dest.auth.headers()},
                        auth=dest.auth.requests_auth(), verify=dest.tls_verify,
                        allow_redirects=False)


def _reason_phrase(status: int, reason: str | None) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = (reason or "").strip()[:80]
    return f"HTTP {status}{f' {phrase}' if phrase else ''}"


def store_response(content: bytes) -> Dataset | None:
    """The Store Instances Response (DICOM JSON, read by pydicom) of a body, or None when
    it is not one: then the HTTP status alone decides."""
    try:
        body = json.loads(content)
        if isinstance(body, list) and len(body) == 1:  # some servers wrap it in an array
            body = body[0]
        if not isinstance(body, dict):
            return None
        ds = Dataset.from_json(body)
        for keyword in ("FailedSOPSequence", "ReferencedSOPSequence"):
            for item in ds.get(keyword) or []:  # decodes every element: bad ones raise here
                for _ in item.iterall():
                    pass
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
        return None
    return ds


def _find(ds: Dataset, keyword: str, sop_instance_uid: str) -> Dataset | None:
    for item in ds.get(keyword) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            return item
    return None


def _code(item: Dataset, keyword: str) -> int | None:
    value = item.get(keyword)
    return int(value) if isinstance(value, int) else None


def outcome(status: int, reason: str | None, content: bytes, *, sop_instance_uid: str,
            sop_class_uid: str, destination: str) -> Outcome:
    """What the response to the request that carried one object means for that object."""
    http = _reason_phrase(status, reason)
    body = store_response(content) if status in _RESPONSE_WITH_OBJECTS and content else None
    if body is not None:
        failed = _find(body, "FailedSOPSequence", sop_instance_uid)
        if failed is not None:
            return _failed_item(_code(failed, "FailureReason"), http,
                                sop_class_uid=sop_class_uid, destination=destination)
        stored = _find(body, "ReferencedSOPSequence", sop_instance_uid)
        if stored is not None:
            warning = _code(stored, "WarningReason")
            if warning is None:
                return Outcome(Verdict.SENT, None if status == 200 else
                               f"stored, but the server answered {http}", 0)
            return from_status(warning, destination=destination, sop_class_uid=sop_class_uid)
    if status == 200:  # all stored (PS3.18 10.5.3.1), whether or not the body lists it
        return Outcome(Verdict.SENT, None, 0)
    return _http_outcome(status, http, destination)


def _failed_item(code: int | None, http: str, *, sop_class_uid: str, destination: str
                 ) -> Outcome:
    if code == TRANSFER_SYNTAX_NOT_SUPPORTED:
        return Outcome(Verdict.NOT_ACCEPTED, f"not accepted by {destination}: transfer "
                                             f"syntax not supported (0x{code:04X}, {http})", code)
    if code is None:
        return Outcome(Verdict.RETRY, f"failed without a failure reason ({http})", None)
    result = from_status(code, destination=destination, sop_class_uid=sop_class_uid)
    if result.verdict is Verdict.SENT:  # a failure reason that reads as success: still failed
        return Outcome(Verdict.RETRY, f"failed: failure reason 0x{code:04X} ({http})", code)
    return Outcome(result.verdict, f"{result.detail} ({http})", code)


def _http_outcome(status: int, http: str, destination: str) -> Outcome:
    hint = _HINTS.get(status)
    text = f"{destination} answered {http}{f': {hint}' if hint else ''}"
    if status in _NOT_ACCEPTED_HTTP:
        return Outcome(Verdict.NOT_ACCEPTED, text)
    if status in _BUSY_HTTP:
        return Outcome(Verdict.BUSY, text)
    if 300 <= status < 400:
        return Outcome(Verdict.DEAD, f"{text}: redirects are not followed, configure the "
                                     "final DICOMweb root")
    if status in _DEAD_HTTP:
        return Outcome(Verdict.DEAD, text)
    if status == 202:
        text = f"{destination} answered {http} without a record of the object"
    return Outcome(Verdict.RETRY, text)


def exception_outcome(exc: requests.RequestException, dest: StowRsDestination) -> Outcome:
    """A request that got no response: retried (dead after ``sender.max_attempts``)."""
    if isinstance(exc, requests.Timeout):
        why = f"no response within {dest.timeout_s:g} s"
    elif isinstance(exc, requests.exceptions.SSLError):
        why = "TLS handshake or certificate verification failed"
    elif isinstance(exc, requests.ConnectionError):
        why = "connection failed"
    else:
        why = "request failed"
    # requests' messages name the host, port and path (the url has no credentials)
    return Outcome(Verdict.RETRY, f"{dest.name}: {why}: {type(exc).__name__}: {exc}"[:600])
