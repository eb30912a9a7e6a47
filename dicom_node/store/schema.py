"""The schema's version: bring a database to the code's revision on start-up, or refuse.

Alembic keeps the revision in ``alembic_version``. On start-up (:func:`migrate`, called by
``make_engine``) a database is in one of four cases:

- fresh (none of the node's tables): upgraded to head, revision by revision;
- made by a version of the node from before the migrations (tables, no ``alembic_version``):
  brought to the first revision by the node's old upgrade (create missing tables, add missing
  columns), stamped with it, then upgraded to head;
- at a revision of this code: upgraded to head (nothing to do when it is there);
- at a revision this code does not know (a newer node migrated it): refused with
  :class:`SchemaTooNewError`; writing to a schema one does not know could corrupt it.

Several processes start at once against one database (receivers, workers): the whole check
and migration is one transaction holding a lock, so one migrates and the others then find it
at head. PostgreSQL: ``pg_advisory_xact_lock`` (DDL is transactional there); SQLite: the
engine's ``BEGIN IMMEDIATE`` already is the database's single writer lock.

A new revision: change ``dicom_node.store.db``, then write
``dicom_node/store/migrations/versions/<nnnn>_<what>.py`` by hand or from
``alembic.command.revision(config(conn, metadata), message, autogenerate=True)`` with a
connection to a database at head, and review it (see ``tests/unit/dicom_node/test_schema.py``:
the migrated schema must equal the metadata on SQLite and PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from dicom_node.errors import DatabaseUnavailableError, SchemaTooNewError

logger = logging.getLogger(__name__)
# Alembic logs "Context impl ..." at INFO on every start; the node logs what changed itself
logging.getLogger("alembic").setLevel(logging.WARNING)

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"
# pg_advisory_xact_lock key of the node's migration (any constant; "dcmnode" in ASCII)
MIGRATION_LOCK_KEY = 0x64636D6E6F6465


def config(conn: Connection, metadata: MetaData) -> Config:
    """Alembic's configuration for ``conn``, built in code (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["connection"] = conn
    cfg.attributes["metadata"] = metadata
    return cfg


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory(str(SCRIPT_LOCATION)).get_current_head()
    assert head is not None, f"no revision under {SCRIPT_LOCATION}"
    return head


def first_revision_metadata() -> MetaData:
    """The tables of revision 0001, as the migration creates them (run on an in-memory
    SQLite and reflected): what a database made before the migrations is brought to before
    it is stamped, whatever later revisions changed in ``dicom_node.store.db``."""
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            command.upgrade(config(conn, MetaData()), FIRST_REVISION)
            frozen = MetaData()
            frozen.reflect(conn)
        frozen.remove(frozen.tables["alembic_version"])
        return frozen
    finally:
        engine.dispose()


def current_revision(conn: Connection) -> str | None:
    """The revision the database is stamped with (None: not under migrations yet)."""
    return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, metadata: MetaData,
            upgrade_legacy: Callable[[Connection], None]) -> None:
    """Bring the database to head (see the module doc); one locked transaction.

    ``upgrade_legacy`` brings a database made before the migrations to the first revision
    (``dicom_node.store.db`` passes its create-missing-tables-and-columns step, run with
    :func:`first_revision_metadata`).
    """
    try:
        conn = engine.connect()
    except OperationalError as exc:  # refused, unknown host, authentication failed, ...
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise DatabaseUnavailableError(
            f"cannot connect to the database {_where(engine)}: {reason}") from exc
    with conn, conn.begin():  # SQLite: BEGIN IMMEDIATE, the writer lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                         {"key": MIGRATION_LOCK_KEY})
        cfg = config(conn, metadata)
        script = ScriptDirectory.from_config(cfg)
        current = current_revision(conn)
        known = {rev.revision for rev in script.walk_revisions()}
        head = script.get_current_head()
        if current is not None and current not in known:
            raise SchemaTooNewError(
                f"the database {_where(engine)} is at schema revision {current!r}, which this "
                f"version of dicom-node does not know (its newest is {head!r}): "
                "a newer version migrated it. Run that newer version (or restore a backup made "
                "before the upgrade); this version will not write to it")
        if current is None and set(inspect(conn).get_table_names()) & set(metadata.tables):
            upgrade_legacy(conn)
            command.stamp(cfg, FIRST_REVISION)
            logger.info("database from before schema revisions: brought to revision %s",
                        FIRST_REVISION)
            current = FIRST_REVISION
        if current != head:
            command.upgrade(cfg, "head")
            # a fresh database is no news (every first start); an upgrade of one with data is
            logger.log(logging.DEBUG if current is None else logging.INFO,
                       "database schema migrated from revision %s to %s", current, head)


def _where(engine: Engine) -> str:
    """The database, without the password of its URL."""
    return engine.url.render_as_string(hide_password=True)
