"""The outcome of one try to deliver one object, whatever the transport, and its ledger write.

C-STORE (a DIMSE status) and STOW-RS (an HTTP status, and per object a Failure or Warning
Reason, which are DIMSE status codes too: PS3.18 10.5.3) end in the same few verdicts, so
both transports record them the same way through :func:`record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import UID

from dicom_node.delivery.ledger import Delivery, Ledger
from dicom_node.delivery.status import StatusClass, classify, describe


class Verdict(StrEnum):
    SENT = "sent"  # stored (``detail``: a warning, if any)
    NOT_ACCEPTED = "not_accepted"  # the destination does not take this object: terminal
    RETRY = "retry"  # transient: retried after a backoff, dead after sender.max_attempts
    BUSY = "busy"  # the destination is out of resources: retried, never dead-lettered
    DEAD = "dead"  # retrying cannot help (bad credentials, refused request): dead at once


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    detail: str | None = None  # the reason (or the warning of a SENT)
    code: int | None = None  # the DIMSE status / failure / warning reason, if one came


def from_status(code: int | None, *, destination: str, sop_class_uid: str) -> Outcome:
    """The verdict of a DIMSE status (C-STORE response, STOW-RS Failure/Warning Reason)."""
    cls = classify(code)
    if code is not None and cls is StatusClass.SUCCESS:
        return Outcome(Verdict.SENT, None, code)
    if code is not None and cls is StatusClass.WARNING:
        return Outcome(Verdict.SENT, f"stored with warning: {describe(code)}", code)
    if cls is StatusClass.NOT_SUPPORTED:
        return Outcome(Verdict.NOT_ACCEPTED, f"not accepted by {destination}: "
                                             f"{UID(sop_class_uid).name}, {describe(code)}", code)
    if cls is StatusClass.OUT_OF_RESOURCES:
        return Outcome(Verdict.BUSY, describe(code), code)
    return Outcome(Verdict.RETRY, describe(code), code)


def record(ledger: Ledger, d: Delivery, outcome: Outcome, *, syntax: str) -> bool:
    """Write ``outcome`` for ``d``; True when the object was stored."""
    if outcome.verdict is Verdict.SENT:
        ledger.sent(d, code=outcome.code or 0, syntax=syntax, warning=outcome.detail)
        return True
    reason = outcome.detail or outcome.verdict.value
    if outcome.verdict is Verdict.NOT_ACCEPTED:
        ledger.not_accepted(d, reason, outcome.code)
    elif outcome.verdict is Verdict.DEAD:
        ledger.dead(d, reason, outcome.code)
    else:
        ledger.failed(d, reason, outcome.code, dead_letter=outcome.verdict is Verdict.RETRY)
    return False
