"""Fixtures of the output tests: the dciodvfy gate and the real radiographs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from outputs_helpers import CR_J2K, NIH_SC, save
from pydicom.dataset import Dataset
from sr_checks import assert_truthful_sr


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


@pytest.fixture(autouse=True)
def every_sr_tells_the_truth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SR any test builds is parsed with highdicom and checked (sr_checks.py)."""
    outputs = sys.modules.get("dicom_node.outputs")
    if outputs is None:
        return  # nothing in this test can build outputs
    build_sr = outputs.build_sr

    def checked(sources, settings, uid_seed):  # type: ignore[no-untyped-def]
        built = build_sr(sources, settings, uid_seed)
        assert_truthful_sr(built.dataset, sources, settings)
        return built

    monkeypatch.setattr(outputs, "build_sr", checked)
