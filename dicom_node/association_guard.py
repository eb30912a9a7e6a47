"""Bounds on every association the listener accepts, so one peer cannot starve another.

pynetdicom restarts its idle timer on every PDU and reads a PDU whole before anything can
look at it, so a peer that trickles a small PDU just under the network timeout holds an
association slot for ever, and one that declares a huge PDU is buffered in full. The guard
adds, per association (one :class:`Flow` each, fed by :mod:`dicom_node.transport` and by
pynetdicom events as the bytes arrive):

* PDU size: a P-DATA-TF declaring more than ``dicom.maximum_pdu_size`` (what we announced;
  other PDUs: 1 MiB) is aborted on its header, before its body is read;
* instance size: a message whose data set passes ``storage.max_instance_bytes`` is aborted
  while its fragments arrive (counted per P-DATA PDU, before it is written anywhere);
* negotiation: an association not negotiated within ``dicom.acse_timeout_s`` is dropped
  (pynetdicom's own timer cannot fire while a read is blocked mid-PDU);
* deadline: any association older than ``dicom.association_deadline_s`` is aborted;
* minimum rate: while a message is in transfer, fewer than ``dicom.min_transfer_rate_bps``
  bytes/s over ``dicom.transfer_rate_window_s`` aborts it;
* calling AE: an association beyond ``dicom.max_associations_per_calling_ae`` from one
  calling AE is rejected as transient (A-ASSOCIATE-RJ, local limit exceeded).

One watchdog thread (monotonic clock) applies the time rules. Every abort and rejection is
logged and written to the audit trail with the calling AE, called AE and peer address.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from sqlalchemy import Engine

from dicom_node.audit import AuditKind, Outcome, record_now
from dicom_node.config import DicomSettings
from dicom_node.transport import abort_connection, discard_partial_dataset

logger = logging.getLogger(__name__)

MAX_CONTROL_PDU_BYTES = 1024 * 1024  # A-ASSOCIATE-RQ with every context and identity fits
_PDATA = 0x04
# A-ABORT source/reason: a policy of this node (service user) vs. an invalid PDU parameter
_USER_ABORT = (0x00, 0x00)
_INVALID_PDU_PARAMETER = (0x02, 0x06)

_REJECT_REASONS = {
    (0x01, 0x01, 0x01): "no reason given",
    (0x01, 0x01, 0x02): "application context name not supported",
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x02, 0x01): "user identity not verified",
    (0x02, 0x03, 0x01): "temporary congestion",
    (0x02, 0x03, 0x02): "local limit exceeded (dicom.max_associations)",
}


@dataclass(frozen=True)
class GuardLimits:
    max_pdu_bytes: int
    max_instance_bytes: int
    negotiation_timeout_s: float
    deadline_s: float
    min_rate_bps: int
    rate_window_s: float
    per_calling_ae: int

    @classmethod
    def from_settings(cls, dicom: DicomSettings, *, max_instance_bytes: int) -> GuardLimits:
        return cls(max_pdu_bytes=dicom.maximum_pdu_size, max_instance_bytes=max_instance_bytes,
                   negotiation_timeout_s=dicom.acse_timeout_s,
                   deadline_s=dicom.association_deadline_s,
                   min_rate_bps=dicom.min_transfer_rate_bps,
                   rate_window_s=dicom.transfer_rate_window_s,
                   per_calling_ae=dicom.max_associations_per_calling_ae)

    @property
    def tick_s(self) -> float:
        return max(0.05, min(0.5, self.rate_window_s / 4, self.deadline_s / 4))


def _ae(value: object) -> str:
    return str(value or "").strip()[:16]


class Flow:
    """What one association has received so far (its DUL thread writes, the watchdog reads)."""

    def __init__(self, guard: AssociationGuard, assoc: Association, started: float) -> None:
        self.guard = guard
        self.assoc = assoc
        self.started = started
        self.received = 0  # bytes read from the socket, partial PDUs included
        self.message_bytes = 0  # data set bytes of the message in transfer
        self.in_pdu = False  # a P-DATA-TF header was read, its body not yet
        self.in_message = False  # a message has started and not ended
        self.negotiated = False
        self.aborted: str | None = None
        self.reject_reason: str | None = None
        self.samples: deque[tuple[float, int]] = deque()  # (time, received), watchdog only

    @property
    def calling_ae(self) -> str | None:
        rq = self.assoc.requestor.primitive
        return _ae(rq.calling_ae_title) if rq is not None else None

    @property
    def called_ae(self) -> str | None:
        rq = self.assoc.requestor.primitive
        return _ae(rq.called_ae_title) if rq is not None else None

    @property
    def peer(self) -> str:
        info = self.assoc.requestor.address_info
        return f"{info.address}:{info.port}" if info is not None else "?"

    # -- fed by the transport, in the association's DUL thread
    def pdu_header(self, pdu_type: int, length: int) -> None:
        limit = self.guard.limits.max_pdu_bytes if pdu_type == _PDATA else MAX_CONTROL_PDU_BYTES
        if length > limit:
            self.guard.abort(self, f"PDU type 0x{pdu_type:02X} declares {length} B, more than "
                             f"the {limit} B announced (dicom.maximum_pdu_size)",
                             abort=_INVALID_PDU_PARAMETER)
        elif pdu_type == _PDATA:
            self.in_pdu = True

    def bytes_received(self, n: int) -> None:
        self.received += n

    def pdu_done(self) -> None:
        self.in_pdu = False

    def pdata(self, pdu: bytes) -> None:
        """Walk the PDVs of a P-DATA-TF (PS3.8 9.3.5) before pynetdicom stores them."""
        offset, end = 6, len(pdu)
        while offset + 6 <= end:
            item_length = int.from_bytes(pdu[offset:offset + 4], "big")
            if item_length < 2 or offset + 4 + item_length > end:
                return  # malformed: pynetdicom's decoder refuses it and aborts
            control = pdu[offset + 5]
            last = bool(control & 0x02)
            if control & 0x01:  # command fragment: a new message starts
                self.message_bytes = 0
            else:
                self.message_bytes += item_length - 2
                if self.message_bytes > self.guard.limits.max_instance_bytes:
                    self.guard.abort(self, f"data set passed {self.message_bytes} B, over "
                                     f"storage.max_instance_bytes "
                                     f"({self.guard.limits.max_instance_bytes} B)")
                    return
                if last:
                    self.message_bytes = 0
            self.in_message = not last
            offset += 4 + item_length

    # -- the watchdog's rules
    def violation(self, now: float) -> tuple[str, bool] | None:
        """The rule this association breaks now, if any, and whether to send an A-ABORT."""
        limits = self.guard.limits
        age = now - self.started
        if not self.negotiated and age > limits.negotiation_timeout_s:
            return f"not negotiated within dicom.acse_timeout_s ({limits.negotiation_timeout_s} s)", False
        if age > limits.deadline_s:
            return f"open longer than dicom.association_deadline_s ({limits.deadline_s} s)", True
        return self._too_slow(now, limits)

    def _too_slow(self, now: float, limits: GuardLimits) -> tuple[str, bool] | None:
        if limits.min_rate_bps <= 0 or not (self.in_pdu or self.in_message):
            self.samples.clear()
            return None
        self.samples.append((now, self.received))
        base = None
        while self.samples and self.samples[0][0] <= now - limits.rate_window_s:
            base = self.samples.popleft()
        if base is None:  # in transfer for less than the window
            return None
        self.samples.appendleft(base)
        rate = (self.received - base[1]) / (now - base[0])
        if rate >= limits.min_rate_bps:
            return None
        return (f"message in transfer at {rate:.0f} B/s over {now - base[0]:.1f} s, below "
                f"dicom.min_transfer_rate_bps ({limits.min_rate_bps})"), True


class AssociationGuard:
    """Flows of the listener's associations, their limits, the watchdog and the audit."""

    def __init__(self, limits: GuardLimits, engine: Engine | None,
                 clock: Callable[[], float] = time.monotonic, *,
                 receiver: str | None = None) -> None:
        self.limits = limits
        self.engine = engine
        # the audit subject of association events: which process received it (owner id
        # and pid; several receiver processes may share one port)
        self.receiver = receiver
        self.clock = clock
        self._flows: dict[Association, Flow] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handlers(self) -> list[tuple[Any, ...]]:
        """The pynetdicom event handlers that feed the guard (bind them on the server)."""
        return [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_DATA_RECV, self._on_data),
                (evt.EVT_CONN_CLOSE, self._on_closed)]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="association-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def open(self, assoc: Association) -> Flow:
        flow = Flow(self, assoc, self.clock())
        with self._lock:
            self._flows[assoc] = flow
        return flow

    def flow(self, assoc: Association) -> Flow | None:
        with self._lock:
            return self._flows.get(assoc)

    def abort(self, flow: Flow, reason: str, *, abort: tuple[int, int] = _USER_ABORT,
              send_abort_pdu: bool = True) -> None:
        if flow.aborted is not None:
            return
        flow.aborted = reason
        logger.warning("aborting association from %s (calling AE %r): %s", flow.peer,
                       flow.calling_ae, reason)
        abort_connection(flow.assoc, source=abort[0], reason=abort[1],
                         send_abort_pdu=send_abort_pdu)
        self._audit(AuditKind.ASSOCIATION_ABORTED, Outcome.FAILURE, flow, reason)

    def tls_failed(self, client_address: Any, exc: OSError) -> None:
        peer = f"{client_address[0]}:{client_address[1]}"
        logger.warning("TLS handshake with %s failed: %s", peer, type(exc).__name__)
        if self.engine is not None:
            record_now(self.engine, AuditKind.ASSOCIATION_REJECTED, Outcome.FAILURE, peer=peer,
                       detail=f"TLS handshake failed: {type(exc).__name__}")

    # -- pynetdicom event handlers
    def _on_requested(self, event: Any) -> None:
        """Reject (transient) an association beyond the calling AE's share of the slots."""
        assoc, flow = event.assoc, self.flow(event.assoc)
        calling = _ae(assoc.requestor.primitive.calling_ae_title)
        held = sum(1 for other in assoc.ae.active_associations
                   if other is not assoc and _holds_slot(other, calling))
        if flow is None or held < self.limits.per_calling_ae:
            return
        flow.reject_reason = (f"calling AE {calling} already holds {held} associations "
                              f"(dicom.max_associations_per_calling_ae)")
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, local limit exceeded
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # as pynetdicom does after its own rejections

    def _on_accepted(self, event: Any) -> None:
        flow = self.flow(event.assoc)
        if flow is not None:
            flow.negotiated = True
            logger.debug("association accepted from %s calling AE %r", flow.peer,
                         flow.calling_ae)
            self._audit(AuditKind.ASSOCIATION_ACCEPTED, Outcome.SUCCESS, flow, None)

    def _on_rejected(self, event: Any) -> None:
        flow = self.flow(event.assoc)
        if flow is None:
            return
        flow.negotiated = True
        rj = event.assoc.acceptor.primitive
        code = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        reason = flow.reject_reason or _REJECT_REASONS.get(code, f"code {code}")  # type: ignore[arg-type]
        transient = "transient" if code and code[0] == 0x02 else "permanent"
        logger.warning("association rejected (%s) from %s calling AE %r called AE %r: %s",
                       transient, flow.peer, flow.calling_ae, flow.called_ae, reason)
        self._audit(AuditKind.ASSOCIATION_REJECTED, Outcome.FAILURE, flow,
                    f"rejected {transient}: {reason}")

    def _on_data(self, event: Any) -> None:
        data = event.data
        if data[:1] == b"\x04":
            flow = self.flow(event.assoc)
            if flow is not None and flow.aborted is None:
                flow.pdata(data)

    def _on_closed(self, event: Any) -> None:
        discard_partial_dataset(event.assoc)

    # -- the watchdog
    def _watch(self) -> None:
        while not self._stop.wait(self.limits.tick_s):
            try:
                self._check_all()
            except Exception:  # noqa: BLE001 - the watchdog must outlive one bad round
                logger.exception("association watchdog round failed")

    def _check_all(self) -> None:
        now = self.clock()
        with self._lock:
            flows = list(self._flows.items())
        for assoc, flow in flows:
            if assoc.ident is not None and not assoc.is_alive():
                with self._lock:
                    self._flows.pop(assoc, None)
                discard_partial_dataset(assoc)
                continue
            if flow.aborted is None:
                broken = flow.violation(now)
                if broken is not None:
                    self.abort(flow, broken[0], send_abort_pdu=broken[1])

    def _audit(self, kind: AuditKind, outcome: Outcome, flow: Flow, reason: str | None) -> None:
        if self.engine is None:
            return
        detail = f"called AE {flow.called_ae}" + (f"; {reason}" if reason else "")
        record_now(self.engine, kind, outcome, actor=flow.calling_ae, peer=flow.peer,
                   subject=self.receiver, detail=detail)


def _holds_slot(assoc: Association, calling_ae: str) -> bool:
    rq = assoc.requestor.primitive
    return (assoc.is_acceptor and rq is not None and _ae(rq.calling_ae_title) == calling_ae
            and not (assoc.is_rejected or assoc.is_aborted or assoc.is_released))
