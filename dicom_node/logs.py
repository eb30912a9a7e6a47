"""Logging of the node's entry points: one format, and no patient identifier in any record.

:class:`PhiRedactingFilter` sits on every handler :func:`configure_logging` installs, so it
sees every record those handlers write, whichever logger it came from: the message (after
``%`` formatting), the exception text and the stack text pass through
:func:`dicom_node.phi.redact`. Python warnings become log records
(:func:`logging.captureWarnings`), so pydicom's warnings about malformed values, which quote
the value, are scrubbed as well instead of reaching stderr untouched.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from dicom_node.phi import redact

FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s"
_DONE = "_phi_redacted"


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub one record in place (idempotent; later handlers see the scrubbed record)."""
    if getattr(record, _DONE, False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string: keep what can be shown
        message = f"{record.msg} (unformattable arguments)"
    record.msg = redact(message) or ""
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    setattr(record, _DONE, True)
    return record


class PhiRedactingFilter(logging.Filter):
    """A handler filter that never drops a record, only scrubs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


# Libraries whose INFO lines say what *they* did (highdicom: ~26 lines per result; waitress,
# APScheduler, urllib3 retries ...): WARNING and above unless the node runs at DEBUG.
THIRD_PARTY = ("highdicom", "pynetdicom", "urllib3", "requests", "apscheduler", "waitress",
               "matplotlib", "PIL", "monai", "ignite", "numba", "filelock", "fsspec")


def configure_logging(level: str, handler: logging.Handler | None = None) -> logging.Handler:
    """A root handler (stderr unless ``handler`` is given) at ``level``, scrubbed of
    identifiers; handlers installed earlier by someone else get the filter too.

    INFO is what the node did, one line per event (received, study ready, analysed,
    delivered); the loggers of :data:`THIRD_PARTY` libraries are held at WARNING unless
    ``level`` is DEBUG. Always: pynetdicom at WARNING at least (its DEBUG dumps PDUs);
    pydicom at ERROR (its warnings arrive once, through :mod:`warnings`, and its DEBUG
    output dumps raw element bytes that no text filter can recognise).
    """
    handler = handler or logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(PhiRedactingFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cxr_node", False)]:
        root.removeHandler(old)  # called again (tests, reconfiguration): replace, not add
    handler._cxr_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    numeric = getattr(logging, level)
    root.setLevel(numeric)
    for existing in root.handlers:  # handlers someone else installed get the filter too
        if not any(isinstance(f, PhiRedactingFilter) for f in existing.filters):
            existing.addFilter(PhiRedactingFilter())
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG
                                         else max(logging.WARNING, numeric))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, numeric))
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    return handler


@contextmanager
def logging_configured(level: str, handler: logging.Handler | None = None
                       ) -> Iterator[logging.Handler]:
    """:func:`configure_logging` for the length of one command, then logging as it was.

    A command run in-process (tests, tools calling ``dicom_node.cli.main``) must not leave
    its handler behind: it would hold the stderr of that moment (a test's capture, closed
    later) and write the next test's records into it.
    """
    root = logging.getLogger()
    libraries = {name: logging.getLogger(name).level
                 for name in (*THIRD_PARTY, "pynetdicom", "pydicom")}
    filters = {h: list(h.filters) for h in root.handlers}
    level_before = root.level
    capturing = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    handler = configure_logging(level, handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level_before)
        for name, lib_level in libraries.items():
            logging.getLogger(name).setLevel(lib_level)
        for h, kept in filters.items():
            h.filters[:] = kept
        logging.captureWarnings(capturing)
