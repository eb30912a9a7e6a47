"""Database fixtures (a pytest plugin loaded by tests/conftest.py).

- ``postgres_cluster``: one throw-away PostgreSQL cluster for the session
  (:mod:`helpers.postgres`); it FAILS with how to install the binaries when they are missing
  (``make test`` installs them), it does not skip.
- ``postgres_url``: a fresh empty database of that cluster per test, dropped after.
- ``db_url``: the node's database URL, once per engine: ``sqlite`` (a real file under
  tmp_path) and ``postgresql`` (a fresh copy of a database migrated once per session: the
  migration is Alembic's work, a template copy is a file copy). Tests of the database-facing
  modules take it instead of building a ``sqlite:///`` URL, so they run on both engines.
- ``empty_db_url``: the same, both empty (the migrations' own tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.store import db
from helpers.postgres import PostgresCluster, PostgresUnavailable

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    try:
        cluster = PostgresCluster().start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_migrated_template(postgres_cluster: PostgresCluster) -> str:
    """A database at the schema's head, copied by ``db_url`` for each test."""
    name = postgres_cluster.create_database()
    db.make_engine(postgres_cluster.url(name)).dispose()  # no connection may stay to copy it
    return name


def _database(cluster: PostgresCluster, template: str | None = None) -> Iterator[str]:
    name = cluster.create_database(template)
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    yield from _database(postgres_cluster)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        template = request.getfixturevalue("postgres_migrated_template")
        yield from _database(request.getfixturevalue("postgres_cluster"), template)
    else:
        yield f"sqlite:///{tmp_path / 'node.db'}"


@pytest.fixture(params=ENGINES)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'node.db'}"
