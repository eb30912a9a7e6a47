"""Fixtures of the output tests: the dciodvfy gate and the real radiographs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from outputs_helpers import CR_J2K, NIH_SC, save
from pydicom.dataset import Dataset


@pytest.fixture
def dciodvfy_errors(tmp_path: Path) -> Callable[[Dataset, str], list[str]]:
    """Write ``ds`` and return dciodvfy's lines that start with ``Error``."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed" + "; make test installs it")

    def run(ds: Dataset, name: str) -> list[str]:
        path = save(ds, tmp_path / f"{name}.dcm")
        pydicom.dcmread(path)  # round trip first: a file pydicom cannot read fails here
        proc = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        lines = (proc.stdout + proc.stderr).splitlines()
        return [line for line in lines if line.startswith("Error")]

    return run


@pytest.fixture(scope="session")
def real_cr() -> Dataset:
    """The Philips MONOCHROME1 JPEG 2000 CR, read once (builds never modify a source)."""
    if not CR_J2K.exists():
        pytest.fail(f"{CR_J2K} is missing")
    return pydicom.dcmread(CR_J2K)


@pytest.fixture(scope="session")
def real_nih() -> Dataset:
    if not NIH_SC.exists():
        pytest.fail(f"{NIH_SC} is missing")
    return pydicom.dcmread(NIH_SC)
