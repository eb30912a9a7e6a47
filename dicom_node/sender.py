"""Delivery of result objects to the configured destinations (C-STORE SCU or STOW-RS).

Each (output, destination) pair is its own delivery with its own state machine
(:class:`~dicom_node.store.states.DeliveryState`). One association per destination and batch
proposes every object's SOP class in the syntaxes the node can send it in; after the
negotiation each object is decided on its own: sent in the first accepted syntax
(transcoded in memory when that is the SC's configured compressed syntax), ``not_accepted``
when the destination takes neither its class nor a syntax, and by the response status
class otherwise (:mod:`dicom_node.delivery.status`). Nothing one object does (a missing
file, an encoder error, a refused status, an exception) touches another, and nothing is
left ``sending``. The same file, hence the same SOP Instance UID, goes out on every try.
With ``storage_commitment`` the stored objects are then committed (N-ACTION), see
:mod:`dicom_node.delivery.commitment`.

A ``stow-rs`` destination gets one HTTP request per object (:mod:`dicom_node.delivery.stow`)
and the same verdicts, ledger, retries, dead letter and resubmit; storage commitment does
not apply to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config

from dicom_node.clock import Clock
from dicom_node.config import AnyDestination, Destination, SenderSettings, StowRsDestination
from dicom_node.delivery import stow
from dicom_node.delivery.commitment import CommitmentReports
from dicom_node.delivery.ledger import Delivery, Ledger, backoff_delay, resubmit
from dicom_node.delivery.negotiation import (
    decide,
    negotiated,
    preferred_syntaxes,
    requested_contexts,
)
from dicom_node.delivery.outcome import Outcome, Verdict, from_status, record
from dicom_node.delivery.syntaxes import convert
from dicom_node.errors import SpoolError
from dicom_node.net import release_or_abort, set_nodelay
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")

__all__ = ["Sender", "backoff_delay", "resubmit"]


class _Unreadable(Exception):
    """The result file of a delivery is missing or cannot be read: dead letter at once."""


class Sender:
    """``sc_syntax``: the transfer syntax the worker writes the SC in
    (``outputs.sc_transfer_syntax``), offered first to destinations that configure none."""

    def __init__(self, engine: Any, spool: Spool, destinations: Sequence[AnyDestination],
                 settings: SenderSettings, calling_ae: str, *, seed: int | None = None,
                 sc_syntax: str | None = None, clock: Clock | None = None) -> None:
        self.engine = engine
        self.sc_syntax = sc_syntax
        self.spool = spool
        self.destinations = {d.name: d for d in destinations}
        self._sessions: dict[str, requests.Session] = {}
        for dest in destinations:
            if isinstance(dest, StowRsDestination):
                _warn_about_transport(dest)
        self.settings = settings
        self.calling_ae = calling_ae
        self.ledger = Ledger(engine, settings, random.Random(seed), clock)
        # N-EVENT-REPORT handler for the sender's associations and the node's listener
        self.reports = CommitmentReports(self.ledger, settings)

    def recover(self) -> int:
        """Start-up: deliveries caught mid-send by a crash are due again."""
        return self.ledger.recover()

    def run_once(self, now: float | None = None) -> int:
        """Re-queue overdue commitments, then send everything due; returns how many
        objects the destinations stored."""
        now = self.ledger.clock.now() if now is None else now
        for dest in self.destinations.values():
            if dest.storage_commitment:
                self.ledger.commitments_overdue(dest.name, dest.commitment_timeout_s, now)
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        for d in self.ledger.claim(now):
            by_dest[d.destination].append(d)
        sent = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                self.ledger.interrupted(items, "destination is no longer configured")
                continue
            if isinstance(dest, StowRsDestination):
                sent += _StowTry(self, dest, items).run()
            else:
                sent += _DestinationTry(self, dest, items).run()
        return sent

    def session(self, dest: StowRsDestination) -> requests.Session:
        """The kept-alive HTTP session of a STOW-RS destination (made on first use).

        ``trust_env`` is off: no proxy, CA bundle or ``.netrc`` credentials from the
        environment; what the destination's settings say is all that is used."""
        session = self._sessions.get(dest.name)
        if session is None:
            session = self._sessions[dest.name] = requests.Session()
            session.trust_env = False
        return session

    def close(self) -> None:
        """Close the HTTP sessions (the node's shutdown)."""
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


_CHUNKED = threading.Lock()


@contextlib.contextmanager
def streamed() -> Iterator[None]:
    """pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` for one C-STORE: ``send_c_store(path)``
    then sends the file's encoded dataset as it is on disk, in chunks of the peer's PDU size
    (no ``dcmread``, no re-encoding; the context must match its syntax exactly). The flag is
    module state, read when ``send_c_store`` starts: set only here, under a lock, and put
    back, so no other code in the process sees it."""
    with _CHUNKED:
        previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        try:
            yield
        finally:
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


def _warn_about_transport(dest: StowRsDestination) -> None:
    """Say once, at start-up, when a destination's settings expose its traffic."""
    parts = urlsplit(dest.url)
    if dest.auth.type != "none" and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        logger.warning("destination %s: %s auth over plain http sends the credentials in "
                       "clear text; use https", dest.name, dest.auth.type)
    if parts.scheme == "https" and not dest.verify_tls:
        logger.warning("destination %s: TLS certificate verification is off", dest.name)


def _log_stored(stored: Sequence[Delivery], destination: str) -> None:
    """One INFO line per study a try delivered (objects: DEBUG)."""
    by_study: dict[str, list[str]] = defaultdict(list)
    for d in stored:
        by_study[d.study_uid].append(d.kind)
    for study_uid, kinds in by_study.items():
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        logger.info("delivered %d object(s) of study %s to %s (%s)", len(kinds),
                    study_uid or "?", destination, counts)


class _DestinationTry:
    """One association to one destination for a batch of its deliveries.

    ``open`` holds the deliveries not yet decided; whatever happens, none stays
    ``sending`` when :meth:`run` returns.
    """

    def __init__(self, sender: Sender, dest: Destination, items: Sequence[Delivery]) -> None:
        self.sender = sender
        self.ledger = sender.ledger
        self.dest = dest
        self.open: dict[int, Delivery] = {d.id: d for d in items}
        self.stored: list[Delivery] = []

    def run(self) -> int:
        why = "interrupted"
        try:
            ready = [d for d in list(self.open.values()) if self._file_present(d)]
            if ready:
                self._send(ready)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the sender
            logger.exception("delivery batch to %s failed", self.dest.name)
            why = f"interrupted: {type(exc).__name__}: {exc}"
        finally:
            if self.open:
                self.ledger.interrupted(list(self.open.values()), why)
                self.open.clear()
        _log_stored(self.stored, self.dest.name)
        return len(self.stored)

    def _done(self, d: Delivery) -> None:
        self.open.pop(d.id, None)

    def _file_present(self, d: Delivery) -> bool:
        try:
            present = self.sender.spool.path(d.path).is_file()
        except SpoolError as exc:
            present, detail = False, str(exc)
        else:
            detail = f"result file {d.path} is missing"
        if not present:
            self.ledger.dead(d, detail)
            self._done(d)
        return present

    # -- association ------------------------------------------------------------------------

    def _associate(self, ready: Sequence[Delivery]) -> Any | None:
        s = self.sender.settings
        ae = AE(ae_title=self.dest.calling_ae_title or self.sender.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout_s
        contexts = requested_contexts(((d.kind, d.sop_class_uid) for d in ready), self.dest,
                                      self.sender.sc_syntax)
        handlers = [(evt.EVT_CONN_OPEN, set_nodelay), *self.sender.reports.handlers]
        try:
            return ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                                contexts=contexts, evt_handlers=handlers)
        except (OSError, RuntimeError, ValueError) as exc:
            self._fail_all(ready, f"association failed: {exc}")
            return None

    def _fail_all(self, items: Sequence[Delivery], reason: str) -> None:
        for d in items:
            self.ledger.failed(d, reason)
            self._done(d)

    def _send(self, ready: Sequence[Delivery]) -> None:
        assoc = self._associate(ready)
        if assoc is None:
            return
        if not assoc.is_established:
            if negotiated(assoc):  # the destination accepted none of the contexts
                for d in ready:
                    self._decide_and_store(assoc, d)
            else:
                why = ("rejected" if assoc.is_rejected else
                       "aborted" if assoc.is_aborted else "failed")
                self._fail_all(ready, f"association {why} by {self.dest.name}")
            return
        try:
            for d in ready:
                if not assoc.is_established:
                    self._fail_all([x for x in ready if x.id in self.open],
                                   "association lost during the batch")
                    break
                self._decide_and_store(assoc, d)
            if self.dest.storage_commitment and self.stored and assoc.is_established:
                self._request_commitment(assoc)
        finally:
            if assoc.is_established:
                release_or_abort(assoc, self.sender.settings.timeout_s, self.dest.name)

    def _request_commitment(self, assoc: Any) -> None:
        try:
            self.sender.reports.request(assoc, self.dest.name, self.stored)
        except Exception as exc:  # noqa: BLE001 - the objects are stored; the sweep re-sends
            logger.exception("storage commitment request to %s failed", self.dest.name)
            self.ledger.note(self.stored, f"storage commitment request failed: {exc}")

    # -- one object -------------------------------------------------------------------------

    def _decide_and_store(self, assoc: Any, d: Delivery) -> None:
        """Everything about one object; whatever it raises ends this object only."""
        try:
            preferred = preferred_syntaxes(d.kind, self.dest, self.sender.sc_syntax)
            decision = decide(assoc, d.sop_class_uid, preferred, self.dest.name)
            if decision.syntax is None:
                self.ledger.not_accepted(d, decision.reason or "not accepted")
            else:
                self._store(assoc, d, decision.syntax)
        except _Unreadable as exc:
            self.ledger.dead(d, str(exc))
        except Exception as exc:  # noqa: BLE001 - isolate the object, retry it later
            logger.exception("delivery %d to %s failed", d.id, self.dest.name)
            self.ledger.failed(d, f"{type(exc).__name__}: {exc}")
        self._done(d)

    def _file_syntax(self, d: Delivery) -> UID:
        """The transfer syntax of the result file, from its file meta only."""
        try:
            meta = read_file_meta_info(self.sender.spool.path(d.path))
        except (OSError, SpoolError, pydicom.errors.InvalidDicomError) as exc:
            raise _Unreadable(f"result file {d.path} is unreadable: {exc}") from exc
        if str(meta.get("MediaStorageSOPInstanceUID", "")) != d.sop_instance_uid:
            raise _Unreadable(f"result file {d.path} holds another object")
        return UID(str(meta.get("TransferSyntaxUID", "")))

    def _dataset(self, d: Delivery, syntax: UID) -> Dataset:
        try:
            ds = pydicom.dcmread(self.sender.spool.path(d.path))
        except (OSError, SpoolError, pydicom.errors.InvalidDicomError) as exc:
            raise _Unreadable(f"result file {d.path} is unreadable: {exc}") from exc
        if str(ds.get("SOPInstanceUID", "")) != d.sop_instance_uid:
            raise _Unreadable(f"result file {d.path} holds another object")
        try:
            return convert(ds, syntax)
        except Exception as exc:  # noqa: BLE001 - any encoder failure: this object only
            raise _Unreadable(f"cannot encode {d.kind} in {syntax.name}: {exc}") from exc

    def _store(self, assoc: Any, d: Delivery, syntax: UID) -> None:
        """Stream the file when it is in the negotiated syntax, else transcode it."""
        if self._file_syntax(d) == syntax:
            with streamed():
                status = assoc.send_c_store(self.sender.spool.path(d.path))
        else:
            status = assoc.send_c_store(self._dataset(d, syntax))
        code = int(status.Status) if status and "Status" in status else None
        result = from_status(code, destination=self.dest.name, sop_class_uid=d.sop_class_uid)
        if record(self.ledger, d, result, syntax=str(syntax)):
            self.stored.append(d)


class _StowTry:
    """One STOW-RS request per object of a batch for one destination (see
    :mod:`dicom_node.delivery.stow` for why). When the server cannot be reached at all, the
    rest of the batch is not tried and fails with the same reason, as a failed association
    fails a C-STORE batch. Whatever happens, none stays ``sending``."""

    def __init__(self, sender: Sender, dest: StowRsDestination, items: Sequence[Delivery]
                 ) -> None:
        self.sender = sender
        self.ledger = sender.ledger
        self.dest = dest
        self.items = list(items)
        self.stored: list[Delivery] = []

    def run(self) -> int:
        unreachable: Outcome | None = None
        for d in self.items:
            try:
                if unreachable is not None:
                    record(self.ledger, d, unreachable, syntax="")
                else:
                    unreachable = self._deliver(d)
            except Exception as exc:  # noqa: BLE001 - isolate the object, retry it later
                logger.exception("delivery %d to %s failed", d.id, self.dest.name)
                self.ledger.failed(d, f"{type(exc).__name__}: {exc}")
        _log_stored(self.stored, self.dest.name)
        return len(self.stored)

    def _deliver(self, d: Delivery) -> Outcome | None:
        """Send one object and record its outcome; returns the outcome when the server is
        unreachable or busy (the rest of the batch gets the same)."""
        try:
            part10, syntax = self._part10(d)
        except _Unreadable as exc:
            self.ledger.dead(d, str(exc))
            return None
        try:
            response = stow.post(self.sender.session(self.dest), self.dest, part10)
        except requests.RequestException as exc:
            result = stow.exception_outcome(exc, self.dest)
            record(self.ledger, d, result, syntax=syntax)
            return result
        result = stow.outcome(response.status_code, response.reason, response.content,
                              sop_instance_uid=d.sop_instance_uid,
                              sop_class_uid=d.sop_class_uid, destination=self.dest.name)
        if record(self.ledger, d, result, syntax=syntax):
            self.stored.append(d)
        # a busy server (HTTP 503, 429) takes no more of this batch; a busy object (0xA700) is
        # about that object only
        return result if result.verdict is Verdict.BUSY and result.code is None else None

    def _part10(self, d: Delivery) -> tuple[bytes, str]:
        """The result file's bytes, sent unchanged, and its transfer syntax."""
        try:
            data = self.sender.spool.path(d.path).read_bytes()
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (OSError, SpoolError, pydicom.errors.InvalidDicomError) as exc:
            raise _Unreadable(f"result file {d.path} is missing or unreadable: {exc}") from exc
        if str(ds.get("SOPInstanceUID", "")) != d.sop_instance_uid:
            raise _Unreadable(f"result file {d.path} holds another object")
        return data, str(ds.file_meta.get("TransferSyntaxUID", ""))
