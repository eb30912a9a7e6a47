"""Two receivers of one SOP Instance UID race: the insert decides, no file is overwritten.

Two Ingestors (each with its own group-commit writer, as two receiver processes would have)
share one real SQLite file and one spool. Both receive the same UID, and a barrier holds
each between placing its file under its instance name and inserting its row, so both files
are in the instance folder before either row exists.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from helpers.dicomfiles import make_image
from sqlalchemy import select
from test_ingest import _received

from dicom_node.ingest import Ingestor, Received, StoreStatus
from dicom_node.spool import Spool, StoredFile
from dicom_node.store import db


def _race(tmp_path: Path, url: str, first: Received, second: Received
          ) -> tuple[list[StoreStatus], list[StoredFile], Ingestor]:
    receivers = [Ingestor(db.make_engine(url), Spool(tmp_path / "spool"),
                          max_instance_bytes=10_000_000) for _ in range(2)]
    barrier = threading.Barrier(2, timeout=30)
    placed: list[StoredFile] = []

    def hold(stored: StoredFile) -> None:  # both files placed, no row yet
        placed.append(stored)
        barrier.wait()

    statuses: list[StoreStatus] = []
    threads = []
    for receiver, rec in zip(receivers, (first, second), strict=True):
        receiver.placed_hook = hold
        threads.append(threading.Thread(
            target=lambda r=receiver, x=rec: statuses.append(r.ingest(x))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return statuses, placed, receivers[0]


def _rows(ingestor: Ingestor, table):  # type: ignore[no-untyped-def]
    with ingestor.engine.connect() as conn:
        return conn.execute(select(table)).all()


@pytest.mark.parametrize("same_bytes", [False, True], ids=["conflicting", "identical"])
def test_same_uid_raced_by_two_receivers(tmp_path: Path, db_url: str, same_bytes: bool) -> None:
    one = make_image(seed=1)
    other = make_image(seed=2, study_uid=str(one.StudyInstanceUID))
    other.SOPInstanceUID = one.SOPInstanceUID  # the same UID, other pixels
    recs = (_received(one), _received(one if same_bytes else other))
    digests = [hashlib.sha256(r.dataset_bytes).hexdigest() for r in recs]
    assert (digests[0] == digests[1]) is same_bytes
    statuses, placed, ingestor = _race(tmp_path, db_url, *recs)
    assert statuses == [StoreStatus.SUCCESS] * 2  # both acknowledged
    assert len({p.relpath for p in placed}) == 2  # two names: neither renamed over the other
    [row] = _rows(ingestor, db.instances)  # exactly one row: the insert decided
    spool = ingestor.spool
    kept = spool.path(row.path).read_bytes()
    assert hashlib.sha256(kept).hexdigest() == row.sha256  # the acknowledged file, intact
    winner = next(r for r in recs if kept.endswith(r.dataset_bytes))
    files = sorted(p for p in (spool.root / "instances").rglob("*") if p.is_file())
    assert files == [spool.path(row.path)]  # the loser's file left the instance folder
    assert not any((spool.root / "tmp").iterdir())
    quarantined = _rows(ingestor, db.quarantine)
    if same_bytes:
        assert quarantined == []  # identical bytes: the loser's copy removed
    else:
        [q] = quarantined
        loser = recs[1] if winner is recs[0] else recs[0]
        assert q.reason.startswith("conflicting duplicate") and q.sha256 != row.sha256
        assert spool.path(q.path).read_bytes().endswith(loser.dataset_bytes)
