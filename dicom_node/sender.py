"""Delivery of result objects to the configured destinations (C-STORE SCU).

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
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt

from dicom_node.config import Destination, SenderSettings
from dicom_node.delivery.commitment import CommitmentReports
from dicom_node.delivery.ledger import Delivery, Ledger, backoff_delay, resubmit
from dicom_node.delivery.negotiation import (
    decide,
    negotiated,
    preferred_syntaxes,
    requested_contexts,
)
from dicom_node.delivery.status import StatusClass, classify, describe
from dicom_node.delivery.syntaxes import convert
from dicom_node.errors import SpoolError
from dicom_node.net import release_or_abort, set_nodelay
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

__all__ = ["Sender", "backoff_delay", "resubmit"]


class _Unreadable(Exception):
    """The result file of a delivery is missing or cannot be read: dead letter at once."""


class Sender:
    def __init__(self, engine: Any, spool: Spool, destinations: list[Destination],
                 settings: SenderSettings, calling_ae: str, *, seed: int | None = None) -> None:
        self.engine = engine
        self.spool = spool
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae
        self.ledger = Ledger(engine, settings, random.Random(seed))
        # N-EVENT-REPORT handler for the sender's associations and the node's listener
        self.reports = CommitmentReports(self.ledger, settings)

    def recover(self) -> int:
        """Start-up: deliveries caught mid-send by a crash are due again."""
        return self.ledger.recover()

    def run_once(self, now: float | None = None) -> int:
        """Re-queue overdue commitments, then send everything due; returns how many
        objects the destinations stored."""
        now = time.time() if now is None else now
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
            sent += _DestinationTry(self, dest, items).run()
        return sent


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
        self._log_stored()
        return len(self.stored)

    def _log_stored(self) -> None:
        """One INFO line per study this association delivered (objects: DEBUG)."""
        by_study: dict[str, list[str]] = defaultdict(list)
        for d in self.stored:
            by_study[d.study_uid].append(d.kind)
        for study_uid, kinds in by_study.items():
            counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
            logger.info("delivered %d object(s) of study %s to %s (%s)", len(kinds),
                        study_uid or "?", self.dest.name, counts)

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
        contexts = requested_contexts(((d.kind, d.sop_class_uid) for d in ready), self.dest)
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
            decision = decide(assoc, d.sop_class_uid, preferred_syntaxes(d.kind, self.dest),
                              self.dest.name)
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
        ds = self._dataset(d, syntax)
        status = assoc.send_c_store(ds)
        code = int(status.Status) if status and "Status" in status else None
        cls = classify(code)
        if code is not None and cls in (StatusClass.SUCCESS, StatusClass.WARNING):
            warning = (f"stored with warning: {describe(code)}" if cls is StatusClass.WARNING
                       else None)
            self.ledger.sent(d, code=code, syntax=str(syntax), warning=warning)
            self.stored.append(d)
        elif cls is StatusClass.NOT_SUPPORTED:
            self.ledger.not_accepted(d, f"not accepted by {self.dest.name}: "
                                        f"{UID(d.sop_class_uid).name}, {describe(code)}", code)
        else:
            self.ledger.failed(d, describe(code), code,
                               dead_letter=cls is not StatusClass.OUT_OF_RESOURCES)
