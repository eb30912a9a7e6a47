"""Shared fixtures: free ports, real DCMTK peers, node settings on a tmp data dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDICOM = ROOT.parent / "shared" / "realdicom"
if not REALDICOM.exists():  # CI clones next to shared/ as well; allow an override
    REALDICOM = Path(os.environ.get("CXR_REALDICOM", "/work/shared/realdicom"))

sys.path.insert(0, str(ROOT / "tests"))
# Fixture modules of sub-suites are plugins, not conftest.py files: test modules import this
# file's helpers as ``conftest``, and a second conftest.py would shadow that module name.
sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "outputs"))
pytest_plugins = ["outputs_fixtures", "helpers.db_fixtures"]

GPU_SKIP_REASON = ("needs CUDA: torch.cuda.is_available() is False here; "
                   "run `pytest -m gpu` on a machine with an NVIDIA GPU")

if TYPE_CHECKING:
    from helpers.demo_build import Build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run wherever torch sees CUDA and are skipped, with the reason,
    elsewhere (torch is imported only when such a test was collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Tests that name a real peer fail (not skip) when it is missing: make test installs it."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make test` (it installs the Debian packages)")
    return path


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def realdicom() -> Path:
    if not REALDICOM.exists():
        pytest.fail(f"real DICOM folder missing: {REALDICOM}")
    return REALDICOM


class StoreSCP:
    """A real DCMTK storescp destination writing what it receives to a folder."""

    def __init__(self, out: Path, port: int, ae_title: str = "DEST", extra: list[str] | None = None):
        self.out, self.port, self.ae_title = out, port, ae_title
        out.mkdir(parents=True, exist_ok=True)
        # +xa (accept every syntax) unless an association profile (-xf FILE PROFILE) decides
        accept_all = [] if "-xf" in (extra or []) else ["+xa"]
        cmd = [require_tool("storescp"), "-aet", ae_title, "-od", str(out), *accept_all,
               *(extra or []), str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(port)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "dest", free_port())
    yield scp
    scp.stop()


_TS_FLAGS = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
}


def storescu(port: int, files: list[Path], *, called: str = "CXR_AI", calling: str = "PACS",
             extra: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Send files with DCMTK storescu, proposing each file's own transfer syntax.

    storescu proposes one compressed syntax per run, so files are grouped by transfer
    syntax (one association per group, as a PACS with per-syntax routing would do)."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_TS_FLAGS.get(ts, "-xe"), []).append(f)
    result = None
    for flag, group in groups.items():
        cmd = [require_tool("storescu"), "-aec", called, "-aet", calling, flag,
               *(extra or []), "127.0.0.1", str(port), *map(str, group)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            return result
    assert result is not None, "no files to send"
    return result


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines starting with ``Error`` from dicom3tools' dciodvfy (the gate for every output)."""
    res = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.bundles import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def quick_demo_build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The quick demo bundles, built once by ``training demo-bundles --quick`` (a process, as
    the node runs it); tests read them, none changes them (helpers/demo_build.py)."""
    from helpers.demo_build import run_quick_build

    return run_quick_build(tmp_path_factory.mktemp("demo") / "bundles", ROOT)


@pytest.fixture(scope="session")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """(bundle, fit files, validation files): a tiny classifier trained a few steps on
    phantoms with its out-of-distribution gate (tests/helpers/ood.py); built once."""
    from helpers.ood import make_gated_bundle

    root = tmp_path_factory.mktemp("gated")
    return make_gated_bundle(root / "bundle", root / "data")


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights bundle from the model-side test helpers (tests/unit/ai/aihelpers.py).

    Lives here because this must stay the only conftest.py: test modules import its helpers
    as ``conftest``, and a second conftest.py would shadow that module name."""
    sys.path.insert(0, str(ROOT / "tests" / "unit" / "ai"))
    from aihelpers import make_bundle

    path = tmp_path_factory.mktemp("bundles") / "random"
    make_bundle(path)
    return path
