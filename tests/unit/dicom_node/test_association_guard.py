"""The guard's rules on one association, with a fake clock (the socket tests are in
tests/integration/test_receive_limits.py and test_network_abuse.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from helpers.rawdicom import c_store_command, pdata

from dicom_node.association_guard import AssociationGuard, Flow, GuardLimits


class FakeAssoc:
    """Just what the guard reads of a pynetdicom Association."""

    ident = 1

    def __init__(self) -> None:
        rq = SimpleNamespace(calling_ae_title="PACS", called_ae_title="CXR_AI")
        info = SimpleNamespace(address="127.0.0.1", port=5000)
        self.requestor = SimpleNamespace(primitive=rq, address_info=info)
        self.dul = SimpleNamespace(socket=None)
        self.dimse = SimpleNamespace(message=None)

    def is_alive(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _guard(**kw: Any) -> tuple[AssociationGuard, Flow, Clock]:
    values = dict(max_pdu_bytes=16384, max_instance_bytes=1000, negotiation_timeout_s=5,
                  deadline_s=60, min_rate_bps=100, rate_window_s=4, per_calling_ae=2)
    values.update(kw)
    clock = Clock()
    guard = AssociationGuard(GuardLimits(**values), None, clock=clock)  # type: ignore[arg-type]
    flow = guard.open(FakeAssoc())  # type: ignore[arg-type]
    return guard, flow, clock


def _tick(guard: AssociationGuard, clock: Clock, seconds: float, step: float = 0.5,
          feed: int = 0) -> None:
    """Advance the clock, the flow receiving ``feed`` bytes per step, watchdog each step."""
    for _ in range(int(seconds / step)):
        clock.now += step
        for flow in guard._flows.values():
            flow.received += feed
        guard._check_all()


def test_data_set_over_the_instance_limit_aborts_while_it_arrives() -> None:
    guard, flow, _ = _guard()
    flow.pdata(c_store_command("1.2.3"))
    for _ in range(3):
        flow.pdata(pdata(b"\x00" * 300, command=False, last=False))
    assert flow.aborted is None and flow.message_bytes == 900 and flow.in_message
    flow.pdata(pdata(b"\x00" * 300, command=False, last=False))
    assert flow.aborted is not None and "1200 B" in flow.aborted
    assert "max_instance_bytes" in flow.aborted


def test_each_message_counted_on_its_own() -> None:
    guard, flow, _ = _guard()
    for n in range(5):  # 5 x 800 B in one association: each message under the limit
        flow.pdata(c_store_command(f"1.2.{n}"))
        flow.pdata(pdata(b"\x00" * 400, command=False, last=False))
        flow.pdata(pdata(b"\x00" * 400, command=False, last=True))
        assert not flow.in_message and flow.message_bytes == 0
    assert flow.aborted is None


def test_slow_transfer_aborted_after_the_window_fast_one_kept() -> None:
    guard, flow, clock = _guard()
    flow.negotiated = True
    flow.pdata(c_store_command("1.2.3"))
    flow.pdata(pdata(b"\x00" * 10, command=False, last=False))  # message now in transfer
    _tick(guard, clock, 10, feed=100)  # 200 B/s >= 100 B/s
    assert flow.aborted is None
    _tick(guard, clock, 1.5, feed=20)  # 40 B/s, but over the window still >= 100 B/s
    assert flow.aborted is None
    _tick(guard, clock, 2.5, feed=20)
    assert flow.aborted is not None and "below dicom.min_transfer_rate_bps" in flow.aborted


def test_idle_association_is_not_a_slow_transfer_but_has_a_deadline() -> None:
    guard, flow, clock = _guard(deadline_s=30)
    flow.negotiated = True
    _tick(guard, clock, 29)
    assert flow.aborted is None  # nothing in transfer: the rate rule does not apply
    _tick(guard, clock, 1.5)
    assert flow.aborted is not None and "association_deadline_s" in flow.aborted


def test_pdu_stuck_mid_body_counts_as_in_transfer() -> None:
    guard, flow, clock = _guard()
    flow.negotiated = True
    flow.pdu_header(0x04, 10_000)
    assert flow.in_pdu and flow.aborted is None
    _tick(guard, clock, 5)
    assert flow.aborted is not None and "0 B/s" in flow.aborted


def test_unnegotiated_connection_dropped_after_the_acse_timeout() -> None:
    guard, flow, clock = _guard(negotiation_timeout_s=5)
    _tick(guard, clock, 4.5)
    assert flow.aborted is None
    _tick(guard, clock, 1)
    assert flow.aborted is not None and "acse_timeout_s" in flow.aborted


def test_pdu_length_limits() -> None:
    _, flow, _ = _guard(max_pdu_bytes=16384)
    flow.pdu_header(0x04, 16384)
    assert flow.aborted is None
    flow.pdu_header(0x01, 900_000)  # a large A-ASSOCIATE-RQ is fine
    assert flow.aborted is None
    flow.pdu_header(0x04, 16385)
    assert flow.aborted is not None and "16385 B" in flow.aborted
