"""Database fixtures (a pytest plugin loaded by tests/conftest.py).

- ``postgres_cluster``: one throw-away PostgreSQL cluster for the session
  (:mod:`helpers.postgres`); it FAILS with how to install the binaries when they are missing
  (``make test`` installs them), it does not skip.
- ``postgres_url``: a fresh empty database of that cluster per test, dropped after.
- ``db_url``: the node's database URL, once per engine: ``sqlite`` (a real file under
  tmp_path) and ``postgresql``. Tests of the database-facing modules take it instead of
  building a ``sqlite:///`` URL, so they run against both engines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    name = postgres_cluster.create_database()
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'node.db'}"
