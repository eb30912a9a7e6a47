"""``make viewer`` path: scripts/viewer.py starts Orthanc (DICOMweb) + node + OHIF, prints
working addresses, and stops cleanly; the OHIF server it uses keeps DICOMweb same-origin."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import ROOT, require_tool, wait_until
from helpers.bundles import make_tiny_bundle
from helpers.ohif import ohif_dist, ohif_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LINK = re.compile(r"^  (http://127\.0\.0\.1:(\d+))/viewer\?StudyInstanceUIDs=([\d.]+)$", re.M)


def test_make_viewer_serves_ohif_and_the_studies_same_origin(tmp_path: Path) -> None:
    require_tool("Orthanc")
    ohif_dist()  # fetched (or failed with npm's message) before the clock of the script
    bundle = make_tiny_bundle(tmp_path / "tiny")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "CXR_NODE__MODELS__BUNDLES": f"[{bundle}]", "CXR_NODE__MODELS__DEVICE": "cpu"}
    out_path = tmp_path / "viewer.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "scripts/viewer.py", "--studies", "1",
                                 "--size", "256", "256", "--data-dir", str(tmp_path / "v"),
                                 "--timeout", "90"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        def printed() -> re.Match[str] | None:
            if proc.poll() is not None:
                raise AssertionError(out_path.read_text(encoding="utf-8"))
            return LINK.search(out_path.read_text(encoding="utf-8"))

        link = wait_until(printed, 120, interval=0.5, what="the study link of scripts/viewer.py")
        base, uid = link.group(1), link.group(3)
        text = out_path.read_text(encoding="utf-8")
        assert re.search(r"^OHIF: +http://127\.0\.0\.1:\d+/ \(study list\)$", text, re.M), text
        assert "destination ORTHANC@127.0.0.1:" in text
        page = requests.get(f"{base}/viewer?StudyInstanceUIDs={uid}", timeout=10)
        assert page.ok and "<div id=\"root\"" in page.text  # the SPA, from the fallback
        config = requests.get(f"{base}/app-config.js", timeout=10).text
        assert "qidoRoot: '/dicom-web'" in config
        wasm = next(ohif_dist().glob("*.wasm")).name
        assert requests.get(f"{base}/{wasm}", timeout=10).headers["Content-Type"] == \
            "application/wasm"
        def series_with_seg() -> list[dict] | None:  # the SEG may follow the printed link
            found = requests.get(f"{base}/dicom-web/studies/{uid}/series", timeout=10).json()
            return found if any(s["00080060"]["Value"][0] == "SEG" for s in found) else None

        # the tiny bundle's nodule is always positive: scripts/viewer.py's SEG is there too
        series = wait_until(series_with_seg, 30, interval=0.5, what="the heatmap SEG series")
        modalities = sorted(s["00080060"]["Value"][0] for s in series)
        assert modalities in (["DX", "OT", "PR", "SEG", "SR"], ["CR", "OT", "PR", "SEG", "SR"])
        # Orthanc writes retrieve URLs from the browser's Host: they point at OHIF's origin.
        retrieve = series[0]["00081190"]["Value"][0]
        assert retrieve.startswith(f"{base}/dicom-web/studies/{uid}/series/"), retrieve
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0, out_path.read_text(encoding="utf-8")
    assert "Stopping." in out_path.read_text(encoding="utf-8")


def test_install_fails_clearly_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(ohif_server.OhifError, match="npm is not installed"):
        ohif_server.install_ohif(cache=tmp_path / "cache")
