"""Storage Commitment Push Model against a real pynetdicom SCP on loopback: the report on
the same association, on an association the PACS opens to the node's listener (role
selection), a report with failures, and a PACS that never reports (timeout -> re-sent,
then dead letter)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until
from helpers.pacs import TestPACS
from helpers.results import ResultBench
from pynetdicom import evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP

from dicom_node.config import DicomSettings
from dicom_node.delivery.commitment import CommitmentReports
from dicom_node.scp import start_scp

pytestmark = pytest.mark.integration


@pytest.fixture
def started() -> Iterator[list]:  # type: ignore[type-arg]
    things: list = []  # type: ignore[type-arg]
    yield things
    for thing in reversed(things):
        (thing.stop if hasattr(thing, "stop") else thing.shutdown)()


def _committing(tmp_path: Path, pacs: TestPACS, db_url: str, timeout_s: float = 600
                ) -> ResultBench:
    return ResultBench(tmp_path, [{**pacs.destination, "storage_commitment": True,
                                   "commitment_timeout_s": timeout_s}], db_url=db_url)


def test_report_on_the_same_association(tmp_path: Path, db_url: str, started) -> None:  # type: ignore[no-untyped-def]
    pacs = TestPACS(commitment="same").start()
    started.append(pacs)
    bench = _committing(tmp_path, pacs, db_url)
    study = bench.study()
    assert bench.sender().run_once() == 3
    rows = bench.deliveries(study)
    assert {r.state for r in rows.values()} == {"committed"}
    [request] = pacs.commit_requests
    assert sorted(request.sop_instance_uids) == sorted(r.sop_instance_uid for r in rows.values())
    assert {r.commit_transaction_uid for r in rows.values()} == {request.transaction_uid}
    assert all(r.committed_at >= r.commit_requested_at >= r.sent_at for r in rows.values())
    # the PACS records the response after its send returns (its own thread): bounded wait
    wait_until(lambda: pacs.reports_sent, 5, what="the PACS's record of its report")
    assert pacs.reports_sent == [0x0000]  # answered before the node released
    assert sorted(e.subject for e in bench.audit("committed")) == sorted(
        r.sop_instance_uid for r in rows.values())


def test_release_waits_for_the_report_response(tmp_path: Path, db_url: str, started,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger shows the report before pynetdicom has sent its response: a response held
    back 0.5 s on its way out must still reach the PACS before the node's A-RELEASE."""
    def slow_response(event: Any) -> None:
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            threading.Event().wait(0.5)  # between encoding and the P-DATA: the race window

    plain = CommitmentReports.handlers.fget  # type: ignore[attr-defined]
    monkeypatch.setattr(CommitmentReports, "handlers", property(
        lambda self: [*plain(self), (evt.EVT_DIMSE_SENT, slow_response)]))
    pacs = TestPACS(commitment="same").start()
    started.append(pacs)
    bench = _committing(tmp_path, pacs, db_url)
    study = bench.study()
    assert bench.sender().run_once() == 3
    assert {r.state for r in bench.deliveries(study).values()} == {"committed"}
    wait_until(lambda: pacs.reports_sent, 5, what="the PACS's record of its report")
    assert pacs.reports_sent == [0x0000]


def test_report_on_an_association_the_pacs_opens(tmp_path: Path, db_url: str, started) -> None:  # type: ignore[no-untyped-def]
    listener = DicomSettings(ae_title="CXR_AI", port=free_port())
    pacs = TestPACS(commitment="new", node=("127.0.0.1", listener.port, "CXR_AI")).start()
    started.append(pacs)
    bench = _committing(tmp_path, pacs, db_url)
    sender = bench.sender()
    started.extend(start_scp(listener, bench.ingestor, commitment=sender.reports))
    study = bench.study()
    sender.run_once()
    wait_until(lambda: {r.state for r in bench.deliveries(study).values()} == {"committed"},
               10, what="committed through the listener")
    assert pacs.reports_sent == [0x0000]
    assert {e.peer.split(":")[0] for e in bench.audit("committed")} == {"127.0.0.1"}


def test_failed_references_are_re_sent(tmp_path: Path, db_url: str, started) -> None:  # type: ignore[no-untyped-def]
    refused: set[str] = set()
    pacs = TestPACS(commitment="same", fail_commit=lambda uid: uid in refused).start()
    started.append(pacs)
    bench = _committing(tmp_path, pacs, db_url)
    study = bench.study()
    refused.add(bench.deliveries(study)["sr"].sop_instance_uid)
    sender = bench.sender()
    sender.run_once()
    rows = bench.deliveries(study)
    assert rows["sc"].state == rows["gsps"].state == "committed"
    assert rows["sr"].state == "retrying"
    assert rows["sr"].last_error == "storage commitment failed (failure reason 0x0112)"
    refused.clear()  # the PACS has it now: the re-send is committed
    sender.run_once(time.time() + 100)
    rows = bench.deliveries(study)
    assert rows["sr"].state == "committed" and rows["sr"].attempts == 2
    assert len(pacs.commit_requests) == 2 and pacs.commit_requests[1].sop_instance_uids == [
        rows["sr"].sop_instance_uid]


def test_unconfirmed_commitment_is_re_sent_then_dead(tmp_path: Path, db_url: str, started) -> None:  # type: ignore[no-untyped-def]
    pacs = TestPACS(commitment="never").start()
    started.append(pacs)
    bench = _committing(tmp_path, pacs, db_url, timeout_s=1)
    study = bench.study()
    sender = bench.sender(max_attempts=3, commitment_wait_s=0.2)
    t0 = time.time()
    sender.run_once(t0)
    rows = bench.deliveries(study)
    assert {r.state for r in rows.values()} == {"sent"}
    sender.run_once(t0 + 0.5)  # within the timeout: nothing happens
    assert len(pacs.stored) == 3 and len(pacs.commit_requests) == 1
    for n, at in ((2, t0 + 10), (3, t0 + 20)):  # overdue: re-sent and re-requested
        sender.run_once(at)
        rows = bench.deliveries(study)
        assert {(r.state, r.attempts) for r in rows.values()} == {("sent", n)}
    assert len(pacs.stored) == 9 and len(pacs.commit_requests) == 3
    assert len({r.sop_instance_uid for r in pacs.stored}) == 3  # the same objects each time
    assert len({req.transaction_uid for req in pacs.commit_requests}) == 3
    sender.run_once(t0 + 30)  # the third try was not confirmed either: dead letter
    rows = bench.deliveries(study)
    assert {r.state for r in rows.values()} == {"dead"}
    assert rows["sc"].last_error == ("storage commitment not confirmed within 1 s "
                                     "(after 3 attempts)")
    assert len(bench.audit("dead_lettered")) == 3
