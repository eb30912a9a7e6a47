"""Delivery faults against a real DCMTK storescp: refused, aborting, too slow, down.
Retries back off, end in a dead letter after max_attempts, and resubmit delivers the same
SOP Instance UIDs."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from sqlalchemy import select

from dicom_node.cli import main as cli_main
from dicom_node.store import db

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fault", [["--refuse"], ["--abort-during"], ["--sleep-during", "4"],
                                   None])
def test_fault_dead_letters_then_resubmit_delivers_same_uids(tmp_path: Path, fault,  # type: ignore[no-untyped-def]
                                                             capsys) -> None:
    dest_port = free_port()
    bad = StoreSCP(tmp_path / "bad", dest_port, extra=fault) if fault else None
    settings = node_settings(tmp_path / "node", destinations=[f"DEST@127.0.0.1:{dest_port}"],
                             quiet=0.2, **{"sender.max_attempts": 3, "sender.timeout_s": 2})
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        assert storescu(settings.dicom.port, [write(make_image(), tmp_path / "in")]
                        ).returncode == 0
        rows = wait_until(lambda: (r := query(settings, select(db.deliveries))) and all(
            d.state == "dead" for d in r) and r, 90, what="dead letters")
        assert len(rows) == 3 and all(d.attempts == 3 and d.last_error for d in rows)
        if bad:
            bad.stop()
        good = StoreSCP(tmp_path / "good", dest_port)
        try:
            rc = cli_main(["resubmit", "--all", "--data-dir", str(settings.storage.data_dir)])
            assert rc == 0 and "resubmitted 3" in capsys.readouterr().out
            wait_until(lambda: all(d.state == "sent" for d in query(
                settings, select(db.deliveries))), 60, what="resubmitted deliveries sent")
            got = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in good.files())
            assert got == sorted(o.sop_instance_uid for o in query(settings, select(db.outputs)))
        finally:
            good.stop()
    finally:
        node.stop()
