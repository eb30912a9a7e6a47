"""Storage Commitment against a real Orthanc 1.10 (a Storage Commitment SCP): the node
stores its results, asks Orthanc to commit them, Orthanc reports on an association of its
own to the node's listener, and every delivery becomes ``committed``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from helpers.orthanc import start_orthanc
from sqlalchemy import select

from dicom_node.store import db

pytestmark = pytest.mark.integration


def test_orthanc_commits_the_delivered_results(tmp_path: Path) -> None:
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port)
    node = None
    try:
        settings = node_settings(tmp_path / "node", quiet=0.2, destinations=[{
            "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
            "storage_commitment": True, "commitment_timeout_s": 60}],
            **{"dicom.port": node_port})
        node = start_node(settings, lambda s: FakeAnalyzer())
        ds = make_image()
        assert storescu(node_port, [write(ds, tmp_path / "in")]).returncode == 0
        d, o = db.deliveries.c, db.outputs.c

        def committed() -> list | None:  # type: ignore[type-arg]
            rows = query(settings, select(db.deliveries, o.sop_instance_uid)
                         .join(db.outputs, o.id == d.output_id))
            return rows if len(rows) == 3 and all(r.state == "committed" for r in rows) \
                else None

        rows = wait_until(committed, 60, what="deliveries committed by Orthanc")
        assert len({r.commit_transaction_uid for r in rows}) == 1
        assert all(r.committed_at >= r.commit_requested_at for r in rows)
        stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.rest("/instances?expand")}
        assert {r.sop_instance_uid for r in rows} <= stored
        events = query(settings, select(db.audit_events)
                       .where(db.audit_events.c.kind == "committed"))
        assert sorted(e.subject for e in events) == sorted(r.sop_instance_uid for r in rows)
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
