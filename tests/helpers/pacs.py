"""A hostile-on-demand PACS for delivery tests: a real pynetdicom SCP on loopback.

It accepts only the SOP classes and transfer syntaxes it is told to, answers each C-STORE
with the status it is told to, keeps what it stored (with the transfer syntax of the
context it came in), and plays the Storage Commitment SCP: it reports on the same
association, on an association of its own to the node's listener, or never.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from conftest import free_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
ALL_RESULTS = {SecondaryCaptureImageStorage: UNCOMPRESSED,
               ComprehensiveSRStorage: UNCOMPRESSED,
               GrayscaleSoftcopyPresentationStateStorage: UNCOMPRESSED}
Reporting = Literal["same", "new", "never"]


@dataclass
class Stored:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: Dataset


@dataclass
class CommitRequest:
    transaction_uid: str
    sop_instance_uids: list[str]


@dataclass
class TestPACS:
    """``accept``: SOP class -> accepted transfer syntaxes; ``status``: the C-STORE answer
    (a number, or a function of the dataset); ``commitment``: how it reports."""

    __test__ = False  # not a test class, whatever its name says

    accept: dict[str, Sequence[str]] = field(default_factory=lambda: dict(ALL_RESULTS))
    status: int | Callable[[Dataset], int] = 0x0000
    commitment: Reporting | None = None
    node: tuple[str, int, str] | None = None  # the node's listener (host, port, AE), "new"
    fail_commit: Callable[[str], bool] = lambda uid: False
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    stored: list[Stored] = field(default_factory=list)
    commit_requests: list[CommitRequest] = field(default_factory=list)
    reports_sent: list[int] = field(default_factory=list)  # N-EVENT-REPORT-RSP statuses
    _server: Any = None

    @property
    def destination(self) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    @property
    def name(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> TestPACS:
        ae = AE(self.ae_title)
        for sop_class, syntaxes in self.accept.items():
            ae.add_supported_context(sop_class, list(syntaxes))
        if self.commitment is not None:
            ae.add_supported_context(StorageCommitmentPushModel, UNCOMPRESSED)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def syntaxes_of(self, sop_class: str) -> set[str]:
        return {s.transfer_syntax for s in self.stored if s.sop_class_uid == sop_class}

    # -- handlers ------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        code = self.status(ds) if callable(self.status) else self.status
        if code in (0x0000,) or code & 0xF000 == 0xB000:
            self.stored.append(Stored(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                      str(event.context.transfer_syntax), ds))
        return code

    def _on_action(self, event: Any) -> tuple[int, Dataset | None]:
        info = event.action_information
        uids = [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence]
        self.commit_requests.append(CommitRequest(str(info.TransactionUID), uids))
        report = self._report(info)
        if self.commitment == "same":
            threading.Thread(target=self._report_same, args=(event.assoc, report),
                             daemon=True).start()
        elif self.commitment == "new":
            threading.Thread(target=self._report_new, args=(report,), daemon=True).start()
        return 0x0000, None

    def _report(self, info: Dataset) -> tuple[int, Dataset]:
        stored = {s.sop_instance_uid for s in self.stored}
        ok, failed = [], []
        for item in info.ReferencedSOPSequence:
            good = (str(item.ReferencedSOPInstanceUID) in stored
                    and not self.fail_commit(str(item.ReferencedSOPInstanceUID)))
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            if not good:
                ref.FailureReason = 0x0112  # No such object instance
            (ok if good else failed).append(ref)
        ds = Dataset()
        ds.TransactionUID = info.TransactionUID
        if ok:
            ds.ReferencedSOPSequence = ok
        if failed:
            ds.FailedSOPSequence = failed
        return (2 if failed else 1), ds

    def _send_report(self, assoc: Any, report: tuple[int, Dataset]) -> None:
        status, _ = assoc.send_n_event_report(report[1], report[0], StorageCommitmentPushModel,
                                              StorageCommitmentPushModelInstance)
        self.reports_sent.append(int(status.Status) if "Status" in status else -1)

    def _report_same(self, assoc: Any, report: tuple[int, Dataset]) -> None:
        threading.Event().wait(0.2)  # after the N-ACTION response has gone out
        if assoc.is_established:
            self._send_report(assoc, report)

    def _report_new(self, report: tuple[int, Dataset]) -> None:
        assert self.node is not None, "commitment='new' needs the node's listener address"
        host, port, ae_title = self.node
        ae = AE(self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel, UNCOMPRESSED)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = StorageCommitmentPushModel
        role.scu_role, role.scp_role = False, True  # the PACS is the SCP that reports
        assoc = ae.associate(host, port, ae_title=ae_title, ext_neg=[role])
        if assoc.is_established:
            try:
                self._send_report(assoc, report)
            finally:
                assoc.release()
        else:
            self.reports_sent.append(-1)
