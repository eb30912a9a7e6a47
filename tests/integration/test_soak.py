"""The soak script (`make soak`) for two minutes: mixed traffic, kill -9, outages, a
destination refusing SR, Orthanc committing. Nothing acknowledged may be lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_minute_soak_loses_nothing(tmp_path: Path, tiny_bundle: Path) -> None:
    for name in ("storescu", "storescp", "Orthanc"):
        require_tool(name)
    work = tmp_path / "soak"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--minutes", "2",
                          "--work", str(work), "--bundles", str(tiny_bundle), "--seed", "11"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(res.stdout[-4000:], res.stderr[-4000:])
    report = json.loads((work / "soak.json").read_text())
    assert res.returncode == 0, res.stderr[-2000:]
    assert report["lost"] == 0 and report["not_terminal"] == 0 and report["drained"]
    assert report["kills"] >= 1  # seed 11's chaos schedule: kills at about 16, 65, 87 s
    assert report["instances_acknowledged"] == report["instances_sent"] > 20
    assert report["analysed"] > 0 and report["ignored"] > 0
    # the destination refusing SR ends each SR `not_accepted`; Orthanc commits
    assert report["not_accepted"] > 0 and report["committed"] > 0
    assert report["delivered"] > report["committed"]
    assert report["rss_mib_max"] > 0 and report["threads_max"] > 0
