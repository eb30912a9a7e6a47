"""Fixtures of the web tests (a plugin module, not a conftest: a second module named
``conftest`` would shadow tests/conftest.py when pytest is given several paths)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
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


@pytest.fixture
def web_env(web_template: tuple[Path, WebData], tmp_path: Path) -> Iterator[WebEnv]:
    source, data = web_template
    data_dir = tmp_path / "node"
    shutil.copytree(source, data_dir, ignore=shutil.ignore_patterns("thumbs"))
    settings = web_settings(data_dir)
    engine = db.make_engine(settings.database_url)
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
