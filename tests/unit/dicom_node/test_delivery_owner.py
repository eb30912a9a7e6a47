"""Several senders on one database: a restarted sender recovers only its own mid-send
deliveries (real SQLite file and PostgreSQL); a live sibling's batch is left alone."""

from __future__ import annotations

import random
from pathlib import Path

from helpers.results import SENDER_DEFAULTS, ResultBench

from dicom_node.config import SenderSettings
from dicom_node.delivery.ledger import Ledger
from dicom_node.store.states import DeliveryState


def test_restart_recovers_its_own_batch_only(tmp_path: Path, db_url: str) -> None:
    bench = ResultBench(tmp_path, [{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}], db_url=db_url)
    bench.study(seed=0)
    bench.study(seed=1)
    settings = SenderSettings(**SENDER_DEFAULTS)
    a = Ledger(bench.engine, settings, random.Random(0), owner="host:1:sender:0")
    b = Ledger(bench.engine, settings, random.Random(0), owner="host:1:sender:1")
    claimed_a = a.claim()
    assert len(claimed_a) == 6  # two studies' SR, SC, GSPS
    sending = {r.id: r for r in bench.rows() if r.state == DeliveryState.SENDING}
    assert set(sending) == {d.id for d in claimed_a}
    assert b.recover() == 0  # a is alive and sending: not b's to reset
    assert {r.id for r in bench.rows() if r.state == DeliveryState.SENDING} == set(sending)
    assert a.recover() == 6  # a restarted: its batch is due again
    assert {r.state for r in bench.rows()} == {DeliveryState.PENDING}
    bench.close()
