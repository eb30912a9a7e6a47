"""Group commit on a real SQLite file: concurrent callers share transactions, a failing one
is rolled back alone, each caller returns only after its batch committed; and the ingest
paths around it (same UID with different bytes at once, a header longer than the tap)."""

from __future__ import annotations

import gc
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers.counting import count_calls
from helpers.dicomfiles import make_image, received
from sqlalchemy import Connection, event, insert, select

from dicom_node import ingest
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.store.group_commit import Batch, GroupCommit
from dicom_node.tap import TAP_BYTES
from dicom_node.transport import TappedFile


def _quarantine_row(conn: Connection, reason: str) -> int:
    return conn.execute(insert(db.quarantine).values(
        path="x", size=1, sha256="0" * 64, received_at=0.0, reason=reason)
    ).inserted_primary_key[0]


def test_callers_share_commits_and_a_failure_is_rolled_back_alone(tmp_path: Path,
                                                                   db_url: str) -> None:
    engine = db.make_engine(db_url)
    writer = GroupCommit(engine, linger_s=0.05)
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    release = threading.Event()
    results: dict[int, Any] = {}

    def work(i: int) -> Any:
        def run(conn: Connection, batch: Batch) -> int:
            row = _quarantine_row(conn, f"r{i}")
            if i == 3:
                raise ValueError("this one fails")
            return row
        return run

    def caller(i: int) -> None:
        with writer.expect():
            release.wait(5)
            try:
                results[i] = writer.run(work(i), timeout_s=10)
            except ValueError as exc:
                results[i] = exc

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert isinstance(results.pop(3), ValueError)
    assert len(results) == 7 and all(isinstance(v, int) for v in results.values())
    with engine.connect() as conn:
        reasons = sorted(conn.execute(select(db.quarantine.c.reason)).scalars())
    assert reasons == sorted(f"r{i}" for i in range(8) if i != 3)
    assert 1 <= len(commits) < 8 and writer.commits == len(commits)


def test_same_uid_different_bytes_at_once_stores_one_quarantines_the_other(
        tmp_path: Path, db_url: str) -> None:
    engine = db.make_engine(db_url)
    ing = Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=10_000_000)
    first = make_image(seed=1)
    second = make_image(seed=2)
    second.SOPInstanceUID = first.SOPInstanceUID
    second.StudyInstanceUID = first.StudyInstanceUID
    statuses: list[StoreStatus] = []
    threads = [threading.Thread(target=lambda ds=ds: statuses.append(ing.ingest(received(ds))))
               for ds in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.SUCCESS]
    with engine.connect() as conn:
        [row] = conn.execute(select(db.instances)).all()
        [q] = conn.execute(select(db.quarantine)).all()
    assert "conflicting duplicate" in q.reason and q.sha256 != row.sha256
    assert ing.spool.path(row.path).is_file() and ing.spool.path(q.path).is_file()


def test_header_longer_than_the_tap_is_read_from_the_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    ing = Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=10_000_000)
    ds = make_image()
    ds.add_new(0x00090010, "LO", "BLOB")
    ds.add_new(0x00091001, "OB", bytes(2 * TAP_BYTES))  # before StudyInstanceUID
    calls: Counter[str] = Counter()
    for name in ("_parse_tap", "_parse_file"):
        count_calls(monkeypatch, calls, ingest, name)
    assert ing.ingest(received(ds)) == StoreStatus.SUCCESS
    assert calls == Counter({"_parse_tap": 1, "_parse_file": 1})
    with engine.connect() as conn:
        row = conn.execute(select(db.instances)).one()
    assert row.study_uid == ds.StudyInstanceUID and row.selection


def test_a_data_set_file_closed_or_dropped_withdraws_its_announcement(tmp_path: Path,
                                                                     db_url: str) -> None:
    """An association that ends mid-transfer never leaves the writer waiting for it."""
    engine = db.make_engine(db_url)
    writer = GroupCommit(engine)
    closed = TappedFile(tempfile.NamedTemporaryFile(dir=tmp_path), writer.announce())
    dropped = TappedFile(tempfile.NamedTemporaryFile(dir=tmp_path), writer.announce())
    assert writer.announced == 2
    closed.close()
    closed.close()  # idempotent
    assert writer.announced == 1
    del dropped
    gc.collect()
    assert writer.announced == 0
