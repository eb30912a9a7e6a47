"""``make demo`` path: scripts/demo.py with a real Orthanc and a real node subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_tool
from helpers.bundles import make_tiny_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_exits_when_done_with_results_in_orthanc(tmp_path: Path) -> None:
    require_tool("Orthanc")
    bundle = make_tiny_bundle(tmp_path / "tiny")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "CXR_NODE__MODELS__BUNDLES": f"[{bundle}]", "CXR_NODE__MODELS__DEVICE": "cpu"}
    res = subprocess.run([sys.executable, "scripts/demo.py", "--exit-when-done", "--studies", "1",
                          "--data-dir", str(tmp_path / "demo"), "--timeout", "75"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    out = res.stdout
    assert res.returncode == 0, f"{out}\n{res.stderr}"
    assert re.search(r"Orthanc web UI: http://127\.0\.0\.1:\d+/app/explorer\.html", out), out
    series = re.findall(r"^  series (\w+) +1 instance\(s\)", out, re.MULTILINE)
    assert sorted(series) in (["DX", "OT", "PR", "SR"], ["CR", "OT", "PR", "SR"]), out
    assert "AI findings SR (CXR AI node)" in out
    assert "Done (--exit-when-done)." in out
    assert (tmp_path / "demo" / "orthanc" / "orthanc.log").exists()
