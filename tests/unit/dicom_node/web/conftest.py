"""Fixtures of the web tests: a populated node database (built once, copied per test) and
a Flask test client on it."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from webdata import TOKEN, WebData, populate, web_settings

from dicom_node import db
from dicom_node.config import Settings
from dicom_node.evaluation.service import EvaluationService
from dicom_node.spool import Spool
from dicom_node.studies import StudyAssembler
from dicom_node.web import create_app
from helpers.fakes import FakeAnalyzer

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class WebEnv:
    settings: Settings
    engine: Engine
    app: Flask
    client: FlaskClient
    data: WebData

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.client.get(url, headers=AUTH, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.client.post(url, headers=AUTH, **kwargs)


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


class StubNode:
    """What the web app reads from a running node: a listener that is up, a loaded (fake)
    model, the assembler and the evaluation service."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.spool = Spool(settings.storage.data_dir / "spool")
        self.assembler = StudyAssembler(engine, self.spool, settings.studies.selection, 0.0)
        self.server: object | None = object()
        self.analyzer: FakeAnalyzer | None = FakeAnalyzer()
        self.model_error: str | None = None
        self.stop_event = threading.Event()
        self.evaluation = EvaluationService(engine, settings, deployed=lambda: self.analyzer,
                                            stop_event=self.stop_event)


@pytest.fixture
def ready_env(web_env: WebEnv) -> Iterator[WebEnv]:
    """``web_env`` behind a ready node with a fake model and the evaluation service."""
    node = StubNode(web_env.settings, web_env.engine)
    app = create_app(web_env.settings, node, testing=True)
    yield WebEnv(web_env.settings, web_env.engine, app, app.test_client(), web_env.data)
    node.evaluation.close()
