"""Hand-overs between role processes on PostgreSQL travel as notifications: with the worker's
and the sender's poll intervals at 60 s, a study sent to a ``--role receiver`` process is
analysed by a ``--role worker`` process and delivered by a ``--role sender`` process well
before either would have polled (each waits on its notification, not its timer)."""

from __future__ import annotations

import pytest
from conftest import StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.dicomfiles import write_phantom_study
from helpers.node import node_settings, write_config
from test_multi_process import Roles

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLL_S = 60.0


def test_receiver_worker_sender_wake_each_other_through_postgresql(
        tmp_path, tiny_bundle, postgres_url) -> None:  # type: ignore[no-untyped-def]
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", quiet=5.0, destinations=[dest.destination],
                             **{"database.url": postgres_url,
                                "models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "workers.mode": "thread", "workers.poll_interval_s": POLL_S,
                                "sender.poll_interval_s": POLL_S})
    config = write_config(settings, tmp_path / "node.yaml")
    _, files = write_phantom_study(tmp_path / "in", 1, seed=3, rows=256, cols=256)
    roles = Roles(config, tmp_path / "logs")
    try:
        roles.spawn("receiver", "receiver")
        roles.spawn("worker", "worker")
        roles.spawn("sender", "sender")
        wait_for_port(settings.dicom.port, timeout=60)
        worker_log, sender_log = tmp_path / "logs" / "worker.log", tmp_path / "logs" / "sender.log"
        wait_until(lambda: "models loaded" in worker_log.read_text(), 120,
                   what="the worker's model")
        wait_until(lambda: "roles sender" in sender_log.read_text(), 60, what="the sender")
        # both have polled once and sleep POLL_S now: only a notification wakes them
        assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: len(dest.files()) >= 3, POLL_S / 2, interval=0.2,
                   what="the results at the destination before any poll")
    finally:
        roles.stop_all()
        dest.stop()
