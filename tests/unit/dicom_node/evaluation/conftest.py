"""Fixtures of the evaluation tests (helpers in evalhelpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalhelpers import ReferenceSet, make_reference_set
from sqlalchemy import Engine

from dicom_node import db


@pytest.fixture(scope="session")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
    yield eng
    eng.dispose()
