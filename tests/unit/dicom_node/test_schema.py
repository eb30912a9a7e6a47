"""The schema's migrations on SQLite and PostgreSQL (a throw-away cluster): up and down, no
drift from ``db.metadata``, a database from before the migrations, one from a newer version
(refused, also by ``dicom-node serve``), and several processes migrating one database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import free_port
from helpers import postgres
from helpers.postgres import PostgresCluster
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from dicom_node.cli import main as cli_main
from dicom_node.config import load_settings
from dicom_node.errors import ConfigError, SchemaTooNewError
from dicom_node.store import db, schema

ROOT = Path(__file__).resolve().parents[3]
TABLES = set(db.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _drift(engine: db.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), db.metadata))


def test_up_to_head_and_down_to_base(empty_db_url: str) -> None:
    engine = db.make_engine(empty_db_url)
    with engine.connect() as conn:
        assert schema.current_revision(conn) == schema.head_revision()
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    with engine.begin() as conn:
        command.downgrade(schema.config(conn, db.metadata), "base")
    assert _tables(empty_db_url) == {"alembic_version"}
    with engine.connect() as conn:
        assert schema.current_revision(conn) is None
    engine.dispose()
    engine = db.make_engine(empty_db_url)  # an emptied database is fresh again: up to head
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    assert _drift(engine) == []
    engine.dispose()


def test_the_migrated_schema_is_the_metadata(empty_db_url: str) -> None:
    engine = db.make_engine(empty_db_url)
    try:
        assert _drift(engine) == []
        with engine.begin() as conn:  # the partial unique index is there: one running run
            ins = db.evaluation_runs.insert().values(job_name="j", kind="reference",
                                                     trigger="manual", started_at=0.0)
            conn.execute(ins.values(state="succeeded"))
            conn.execute(ins.values(state="succeeded"))
            conn.execute(ins.values(state="running"))
        with pytest.raises(IntegrityError, match="(?i)unique"), engine.begin() as conn:
            conn.execute(ins.values(state="running"))
    finally:
        engine.dispose()


def test_a_database_from_before_the_migrations_is_upgraded_and_stamped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    raw = create_engine(url)
    first = schema.first_revision_metadata()  # what versions before the migrations made
    first.create_all(raw, tables=[t for t in first.sorted_tables
                                  if t.name != "confirmed_labels"])
    with raw.begin() as conn:
        conn.execute(first.tables["jobs"].insert().values(study_uid="1.2.3", state="done",
                                                          attempts=0, created_at=1.0))
        conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN selection")
    raw.dispose()
    assert "alembic_version" not in _tables(url)
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert schema.current_revision(conn) == schema.head_revision()
            assert conn.execute(select(db.jobs.c.study_uid)).scalars().all() == ["1.2.3"]
        assert _tables(url) == TABLES | {"alembic_version"}
        assert _drift(engine) == []
    finally:
        engine.dispose()


def _stamp_unknown(url: str) -> None:
    db.make_engine(url).dispose()
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    raw.dispose()


def test_a_newer_schema_is_refused(empty_db_url: str) -> None:
    _stamp_unknown(empty_db_url)
    with pytest.raises(SchemaTooNewError, match="9999_from_the_future") as err:
        db.make_engine(empty_db_url)
    assert "newer version" in str(err.value) and repr(schema.head_revision()) in str(err.value)


def test_serve_refuses_a_newer_schema_and_exits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _stamp_unknown(f"sqlite:///{data / 'node.db'}")
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  data_dir: {data}\nweb:\n  enabled: false\n")
    out = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(config),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode != 0
    assert "schema revision '9999_from_the_future'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


MIGRATE = ("import sys; from dicom_node.store import db, schema; e = db.make_engine(sys.argv[1]);"
           " c = e.connect(); print(schema.current_revision(c)); c.close(); e.dispose()")


def test_two_processes_migrate_one_fresh_postgresql(postgres_cluster: PostgresCluster,
                                                     postgres_url: str) -> None:
    """Both wait on the migration lock (held here first), then race for it when it is freed:
    one migrates, the other finds the schema at head; both start."""
    dbname = postgres_url.rsplit("/", 1)[1]
    holder = psycopg.connect(host="127.0.0.1", port=postgres_cluster.port,
                             user=postgres_cluster.user, dbname=dbname, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATION_LOCK_KEY,))
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, postgres_url], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        waiting = 0
        while waiting < 2 and time.monotonic() < deadline:
            waiting = holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                     " AND NOT granted").fetchone()[0]  # type: ignore[index]
            time.sleep(0.05)
        assert waiting == 2, "both processes should be waiting on the migration lock"
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s)", (schema.MIGRATION_LOCK_KEY,))
        holder.close()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == [schema.head_revision()] * 2
    assert _tables(postgres_url) == TABLES | {"alembic_version"}


def test_database_url_scheme_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"database\.url.*sqlite:///.*postgresql\+psycopg://"
                       ) as err:
        load_settings(None, overrides={"database.url": "mysql://cxr:secret@db/cxr"}, environ={})
    assert "secret" not in str(err.value)
    plain = load_settings(None, overrides={"database.url": "postgresql://cxr@db:5432/cxr"},
                          environ={})
    assert plain.database_url == "postgresql+psycopg://cxr@db:5432/cxr"
    default = load_settings(None, overrides={"storage.data_dir": str(tmp_path)}, environ={})
    assert default.database_url == f"sqlite:///{tmp_path / 'node.db'}"


def test_the_legacy_step_builds_the_first_revision_not_today() -> None:
    """What a pre-migration database is brought to before its stamp is revision 0001's
    schema, so the later revisions (0002 adds ``lease_seq``) then apply to it cleanly."""
    first = schema.first_revision_metadata()
    assert set(first.tables) == TABLES
    assert "lease_seq" not in first.tables["jobs"].c and "lease_seq" in db.jobs.c
    assert schema.head_revision() != schema.FIRST_REVISION


def test_missing_postgresql_binaries_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres.shutil, "which", lambda _name: None)
    monkeypatch.setattr(postgres.glob, "glob", lambda _pattern: [])
    with pytest.raises(postgres.PostgresUnavailable, match="run `make test`"):
        postgres.find_bindir()


def test_serve_without_its_database_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: a message naming the database (password hidden)."""
    monkeypatch.setenv("CXR_NODE__DATABASE__URL",
                       f"postgresql+psycopg://cxr:secret@127.0.0.1:{free_port()}/cxr")
    assert cli_main(["serve", "--data-dir", str(tmp_path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dicom-node: error: cannot connect to the database "
                          "postgresql+psycopg://cxr:***@127.0.0.1:"), err
    assert "secret" not in err and "Traceback" not in err
