"""Fixtures for the model side (helpers live in aihelpers.py, importable from the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aihelpers import make_bundle


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "random"
    make_bundle(path)
    return path
