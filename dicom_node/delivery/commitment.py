"""Storage Commitment Push Model (PS3.4 Annex J), as the SCU.

After the C-STOREs of a batch the sender asks the destination to commit the stored objects
(N-ACTION, action type 1, one Transaction UID per request). The destination answers with
an N-EVENT-REPORT (event type 1: all committed, 2: some failed), either on the same
association or later on an association it opens to the node's listener (where it acts as
the SCP of the SOP class: the listener accepts that role). :class:`CommitmentReports`
handles both; confirmed objects become ``committed``, refused ones are re-sent. Deliveries
left unconfirmed for ``commitment_timeout_s`` are re-sent by the sender's sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import func, select

from dicom_node.config import SenderSettings
from dicom_node.delivery.ledger import Delivery, Ledger
from dicom_node.delivery.negotiation import commitment_accepted
from dicom_node.delivery.status import StatusClass, classify, describe
from dicom_node.delivery.syntaxes import UNCOMPRESSED
from dicom_node.dicomio import referenced_sops
from dicom_node.store import db
from dicom_node.store.states import DeliveryState

logger = logging.getLogger(__name__)

REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)
_NO_SUCH_EVENT_TYPE = 0x0113
_PROCESSING_FAILURE = 0x0110


def action_information(transaction_uid: str, deliveries: Sequence[Delivery]) -> Dataset:
    """The N-ACTION dataset: Transaction UID and one Referenced SOP item per object."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = referenced_sops(deliveries)
    return ds


def add_report_context(ae: AE) -> None:
    """Let a listener take N-EVENT-REPORTs from a PACS that opens its own association
    (SCP/SCU role selection: the PACS proposes to act as the SCP of the SOP class)."""
    ae.add_supported_context(StorageCommitmentPushModel, list(UNCOMPRESSED),
                             scu_role=False, scp_role=True)


class CommitmentReports:
    """EVT_N_EVENT_REPORT handler (sender associations and the listener) and the requests."""

    def __init__(self, ledger: Ledger, settings: SenderSettings) -> None:
        self.ledger = ledger
        self.settings = settings
        self._reported = threading.Condition()
        # Associations whose N-EVENT-REPORT was handled but whose response is not yet on the
        # wire: releasing them earlier would put the A-RELEASE before the response (the peer
        # then sees its report unanswered). Keyed by id(assoc): "handled" -> "encoded" -> gone.
        self._responding: dict[int, str] = {}

    # -- the report ----------------------------------------------------------------------------

    def handle(self, event: Any) -> tuple[int, Dataset | None]:
        """Bound to ``evt.EVT_N_EVENT_REPORT``; answers a status, never raises."""
        peer = f"{event.assoc.remote.get('address', '')}:{event.assoc.remote.get('port', '')}"
        with self._reported:
            self._responding[id(event.assoc)] = "handled"
        try:
            if event.event_type not in (ALL_COMMITTED, SOME_FAILED):
                logger.warning("N-EVENT-REPORT with event type %s from %s ignored",
                               event.event_type, peer)
                return _NO_SUCH_EVENT_TYPE, None
            info = event.event_information
            transaction = str(info.TransactionUID)
            ok = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
            failed = {str(i.ReferencedSOPInstanceUID): _int(i.get("FailureReason"))
                      for i in info.get("FailedSOPSequence", [])}
            n_ok = self.ledger.committed(transaction, ok, peer)
            n_failed = self.ledger.commit_failed(transaction, failed, peer)
        except Exception:  # the edge: a status for the PACS, the report is re-sent by it
            logger.exception("storage commitment report from %s could not be processed", peer)
            return _PROCESSING_FAILURE, None
        logger.info("storage commitment %s from %s: %d committed, %d failed (of %d/%d "
                    "referenced)", transaction, peer, n_ok, n_failed, len(ok), len(failed))
        with self._reported:
            self._reported.notify_all()
        return 0x0000, None

    def _on_dimse_sent(self, event: Any) -> None:
        """The report's response is encoded; its P-DATA goes out next (same thread)."""
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            with self._reported:
                if self._responding.get(id(event.assoc)) == "handled":
                    self._responding[id(event.assoc)] = "encoded"

    def _on_pdu_sent(self, event: Any) -> None:
        """The response is on the wire: a waiting sender may release now."""
        if isinstance(event.pdu, P_DATA_TF):
            with self._reported:
                if self._responding.get(id(event.assoc)) == "encoded":
                    del self._responding[id(event.assoc)]
                    self._reported.notify_all()

    def _on_closed(self, event: Any) -> None:
        with self._reported:
            if self._responding.pop(id(event.assoc), None) is not None:
                self._reported.notify_all()

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_EVENT_REPORT, self.handle), (evt.EVT_DIMSE_SENT, self._on_dimse_sent),
                (evt.EVT_PDU_SENT, self._on_pdu_sent), (evt.EVT_CONN_CLOSE, self._on_closed)]

    # -- the request ---------------------------------------------------------------------------

    def request(self, assoc: Any, destination: str, deliveries: Sequence[Delivery]) -> None:
        """N-ACTION for the objects just stored, then a short wait for the report."""
        if not deliveries:
            return
        if not commitment_accepted(assoc):
            self.ledger.note(deliveries, f"storage commitment not accepted by {destination}")
            return
        transaction = generate_uid(prefix=None)
        self.ledger.commit_requested(deliveries, transaction, self.ledger.clock.now())
        status, _ = assoc.send_n_action(action_information(transaction, deliveries),
                                        REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        code = _int(status.get("Status")) if status else None
        if classify(code) not in (StatusClass.SUCCESS, StatusClass.WARNING):
            self.ledger.note(deliveries, f"storage commitment request to {destination}: "
                                         f"{describe(code)}")
            return
        logger.info("storage commitment %s requested from %s for %d object(s)", transaction,
                    destination, len(deliveries))
        self._wait(assoc, transaction)

    def _wait(self, assoc: Any, transaction: str) -> None:
        deadline = time.monotonic() + self.settings.commitment_wait_s
        while assoc.is_established and time.monotonic() < deadline:
            if self._unconfirmed(transaction) == 0 and id(assoc) not in self._responding:
                return
            with self._reported:
                self._reported.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def _unconfirmed(self, transaction: str) -> int:
        d = db.deliveries.c
        with db.reading(self.ledger.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(db.deliveries).where(
                d.commit_transaction_uid == transaction,
                d.state == DeliveryState.SENT)).scalar_one())


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None
