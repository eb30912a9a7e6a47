"""Readers and writers of the embedded SQLite database (a real WAL file, real threads):
a connection from ``db.reading`` neither waits for a writer nor makes one wait, while every
other transaction still takes the write lock at BEGIN (IMMEDIATE). Before, the assembler's
polls queued behind the instance rows' writer through SQLite's busy handler (up to 0.9 s
measured with 4 associations) and delayed its commits in turn."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import DBAPIError

from dicom_node.store import db

BOUND_S = 10.0  # far under the engine's 30 s busy timeout: a wait for the lock fails here


def _engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    return db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")


def _quarantine_row(conn, reason: str) -> None:  # type: ignore[no-untyped-def]
    conn.execute(insert(db.quarantine).values(path="x", size=1, sha256="0" * 64,
                                              received_at=0.0, reason=reason))


def _in_thread(fn) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_reader_does_not_wait_for_an_open_write_transaction(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with engine.begin() as conn:
        _quarantine_row(conn, "committed before")
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with engine.begin() as conn:  # holds SQLite's write lock until released
            _quarantine_row(conn, "not yet committed")
            writing.set()
            release.wait(BOUND_S * 3)

    w, _ = _in_thread(writer)
    assert writing.wait(BOUND_S)

    def read() -> list[str]:
        with db.reading(engine) as conn:
            return list(conn.execute(select(db.quarantine.c.reason)).scalars())

    r, out = _in_thread(read)
    r.join(BOUND_S)
    still_writing = w.is_alive()
    release.set()
    w.join(BOUND_S)
    assert not r.is_alive(), "the reader waited for the writer's lock"
    assert still_writing
    assert out == [["committed before"]]  # the snapshot before the open transaction


def test_a_writer_does_not_wait_for_an_open_read_transaction(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with db.reading(engine) as conn:
        assert list(conn.execute(select(db.quarantine.c.reason)).scalars()) == []
        assert conn.in_transaction()  # its (deferred) transaction is open meanwhile

        def write() -> int:
            with engine.begin() as w:
                _quarantine_row(w, "written beside a reader")
            return 1

        t, out = _in_thread(write)
        t.join(BOUND_S)
        assert not t.is_alive(), "the writer waited for the reader"
        assert out == [1]
    with db.reading(engine) as conn:
        assert list(conn.execute(select(db.quarantine.c.reason)).scalars()) == [
            "written beside a reader"]


def test_only_reading_connections_begin_deferred(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: statements.append(stmt)
                 if stmt.startswith("BEGIN") else None)
    with db.reading(engine) as conn:
        conn.execute(select(db.quarantine)).all()
    with engine.begin() as conn:
        _quarantine_row(conn, "a write")
    with engine.connect() as conn:  # a plain connection may write: it takes the lock
        conn.execute(select(db.quarantine)).all()
    assert statements == ["BEGIN", "BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]


def test_a_write_through_reading_fails_at_once_on_both_engines(db_url: str) -> None:
    """A write placed in a reading block by mistake fails every time (read-only connection),
    not only when another writer holds SQLite's lock (a deferred transaction cannot upgrade
    then) — so a test finds it; the rows stay as they were."""
    engine = db.make_engine(db_url)
    try:
        with pytest.raises(DBAPIError, match="(?i)read.?only"):
            with db.reading(engine) as conn:
                _quarantine_row(conn, "written through a reader")
        with db.reading(engine) as conn:
            assert conn.execute(select(func.count()).select_from(db.quarantine)).scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("raises", [False, True], ids=["block ends", "block raises"])
def test_a_reading_connection_goes_back_to_the_pool_writable(db_url: str, raises: bool) -> None:
    engine = db.make_engine(db_url)
    try:
        for i in range(engine.pool.size() + 2):  # every pooled connection has been lent to a reader
            try:
                with db.reading(engine) as conn:
                    conn.execute(select(db.quarantine)).all()
                    if raises:
                        raise LookupError("the reader's own error")
            except LookupError:
                pass
            with engine.begin() as conn:
                _quarantine_row(conn, f"write {i} after a reader")
        with db.reading(engine) as conn:
            assert conn.execute(select(func.count()).select_from(db.quarantine)).scalar_one() \
                == engine.pool.size() + 2
    finally:
        engine.dispose()


# the modules that may open a plain connection: the reading helper itself, the PostgreSQL
# session lock (committed on that connection) and the schema migration
PLAIN_CONNECTIONS_ALLOWED = {"dicom_node/store/db.py", "dicom_node/singleton.py",
                             "dicom_node/store/schema.py"}


def test_reads_go_through_reading_everywhere_in_the_node() -> None:
    """``engine.connect()`` begins IMMEDIATE on SQLite like a write: every place that only
    reads (web pages, pollers, the worker's loads, reports, the CLI) uses ``db.reading``;
    writes use ``engine.begin()``. An ast scan of the node's source."""
    root = Path(__file__).resolve().parents[3]
    found = []
    for path in sorted((root / "dicom_node").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "connect" and not node.args
                    and "engine" in ast.unparse(node.func.value)):
                found.append(f"{rel}:{node.lineno}")
    assert found, "the scan finds the allowed connections: it works"
    assert [f for f in found if f.split(":")[0] not in PLAIN_CONNECTIONS_ALLOWED] == []
