"""Retention inside a running node: its thread purges a study once analysed and delivered to
a real storescp, keeps the results a second, unreachable destination has not received yet,
and records it in the audit trail."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from sqlalchemy import select

from dicom_node.store import db

pytestmark = pytest.mark.integration


def test_running_node_purges_delivered_and_keeps_undelivered(tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port())
    gone = f"GONE@127.0.0.1:{free_port()}"  # nothing listens: deliveries keep retrying
    settings = node_settings(tmp_path / "node", quiet=0.2, destinations=[dest.destination, gone],
                             **{"storage.retention.max_age_days": 1e-5,  # < 1 s
                                "storage.retention.interval_s": 0.2,
                                "storage.retention.max_disk_used_pct": None,
                                "sender.max_attempts": 50})
    node = start_node(settings, lambda s: FakeAnalyzer())
    spool = settings.storage.data_dir / "spool"
    try:
        assert storescu(settings.dicom.port, [write(make_image(), tmp_path / "in")]
                        ).returncode == 0
        wait_until(lambda: any(e.kind == "retention_purged"
                               for e in query(settings, select(db.audit_events))),
                   60, what="retention purge")
        deliveries = query(settings, select(db.deliveries))
        by_dest = {d.destination: d.state for d in deliveries}
        assert by_dest[dest.destination] == "sent" and by_dest[gone] in ("pending", "retrying",
                                                                          "sending")
    finally:
        node.stop()
        dest.stop()
    (instance,) = query(settings, select(db.instances))
    assert instance.purged_at is not None and not (spool / instance.path).exists()
    outputs = query(settings, select(db.outputs))
    assert outputs and all(o.purged_at is None and (spool / o.path).exists() for o in outputs)
    (event,) = [e for e in query(settings, select(db.audit_events))
                if e.kind == "retention_purged"]
    assert event.subject == instance.study_uid
    assert event.detail.endswith(f"1 image(s), 0 result object(s), {instance.size} B removed; "
                                 f"{len(outputs)} result object(s) kept (undelivered, "
                                 "uncommitted or local)")
