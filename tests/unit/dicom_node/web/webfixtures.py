"""Fixtures of the web tests (a plugin module, not a conftest: a second module named
``conftest`` would shadow tests/conftest.py when pytest is given several paths)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.postgres import PostgresCluster
from webdata import StubNode, WebData, WebEnv, populate, web_settings

from dicom_node.store import db
from dicom_node.web import create_app


@pytest.fixture(scope="session")
def web_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WebData]:
    data_dir = tmp_path_factory.mktemp("webdata") / "node"
    settings = web_settings(data_dir)
    engine = db.make_engine(settings.database_url)
    try:
        data = populate(settings, engine)
    finally:
        engine.dispose()  # last connection closed: the WAL is checkpointed into node.db
    return data_dir, data


@pytest.fixture(scope="session")
def web_template_postgresql(tmp_path_factory: pytest.TempPathFactory,
                            postgres_cluster: PostgresCluster) -> tuple[Path, WebData, str]:
    """``web_template`` with its rows in a PostgreSQL database (copied per test)."""
    data_dir = tmp_path_factory.mktemp("webdata-pg") / "node"
    name = postgres_cluster.create_database()
    settings = web_settings(data_dir, **{"database.url": postgres_cluster.url(name)})
    engine = db.make_engine(settings.database_url)
    try:
        data = populate(settings, engine)
    finally:
        engine.dispose()  # no connection may stay to a template
    return data_dir, data, name


@pytest.fixture
def web_db() -> str:
    """The engine under the web tests: SQLite; a module runs on both engines by overriding
    this fixture with ``params=ENGINES`` (helpers.db_fixtures)."""
    return "sqlite"


@pytest.fixture
def web_env(web_db: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WebEnv]:
    overrides: dict[str, str] = {}
    if web_db == "postgresql":
        source, data, template = request.getfixturevalue("web_template_postgresql")
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        database = cluster.create_database(template)
        request.addfinalizer(lambda: cluster.drop_database(database))
        overrides["database.url"] = cluster.url(database)
    else:
        source, data = request.getfixturevalue("web_template")
    data_dir = tmp_path / "node"
    shutil.copytree(source, data_dir, ignore=shutil.ignore_patterns("thumbs"))
    settings = web_settings(data_dir, **overrides)
    engine = db.make_engine(settings.database_url)
    assert engine.dialect.name == web_db
    app = create_app(settings, engine=engine, testing=True)
    yield WebEnv(settings, engine, app, app.test_client(), data)
    engine.dispose()


@pytest.fixture
def ready_env(web_env: WebEnv) -> Iterator[WebEnv]:
    """``web_env`` behind a ready node with a fake model and the evaluation service."""
    node = StubNode(web_env.settings, web_env.engine)
    app = create_app(web_env.settings, node, testing=True)
    yield WebEnv(web_env.settings, web_env.engine, app, app.test_client(), web_env.data)
    node.evaluation.close()
