"""The README path, as a newcomer runs it: `dicom-node serve` on the shipped config/node.yaml
with nothing configured (the demo bundle is built on first start), images sent with DCMTK,
results listed and exported with the CLI, health and readiness over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, free_port, storescu, wait_for_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _http(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token
                                 else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_serve_with_embedded_defaults_then_results_and_export(tmp_path: Path) -> None:
    from training.synth import make_dataset

    data, port, web = tmp_path / "var", free_port(), free_port()
    env = {**os.environ, "CXR_NODE__MODELS__DEMO_BUILD": "quick",
           "CXR_NODE__STUDIES__QUIET_PERIOD_S": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config",
                             "config/node.yaml", "--data-dir", str(data), "--port", str(port),
                             "--web-port", str(web)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60)  # the listener is up before the model is built
        wait_until(lambda: _http(f"http://127.0.0.1:{web}/healthz")[0] == 200, 30,
                   what="/healthz")
        wait_until(lambda: _http(f"http://127.0.0.1:{web}/readyz")[0] == 200, 300,
                   interval=1, what="demo bundle built and loaded (/readyz)")
        assert (data / "models" / "demo").is_dir()
        files = []
        for i, variant in enumerate(("dx_mono1_j2k", "cr_mono2_jpegls")):
            path = tmp_path / "in" / f"{variant}.dcm"
            path.parent.mkdir(exist_ok=True)
            make_dataset(variant, seed=40 + i, rows=900, columns=800).save_as(
                path, enforce_file_format=True)
            files.append(path)
            assert storescu(port, [path]).returncode == 0
        def listed() -> bool:
            doc = json.loads(_cli("results", "--data-dir", str(data), "--json").stdout)
            return len(doc["studies"]) == 2 and all(
                len(s["results"]) == 3 and s["findings"] for s in doc["studies"])

        wait_until(listed, 120, interval=1,
                   what="2 studies with findings and 3 results each in `dicom-node results`")
        text = _cli("results", "--data-dir", str(data)).stdout
        assert text.count("(DEMO, not for clinical use)") >= 2 * 4, text  # 4 classifier labels each
        out = _cli("export", "--data-dir", str(data), "--out", str(tmp_path / "export"))
        assert out.returncode == 0, out.stderr
        exported = [pydicom.dcmread(p) for p in (tmp_path / "export").glob("*.dcm")]
        studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                   for f in files}
        assert len(exported) == 6 and {str(d.StudyInstanceUID) for d in exported} == studies
        assert sorted(d.Modality for d in exported).count("SR") == 2
        token = (data / "api-token").read_text().strip()
        assert _http(f"http://127.0.0.1:{web}/api/v1/studies")[0] == 401
        status, body = _http(f"http://127.0.0.1:{web}/api/v1/studies", token)
        assert status == 200 and len(json.loads(body)["items"]) == 2
        status = _cli("status", "--data-dir", str(data))
        assert json.loads(status.stdout)["studies"] == {"done": 2}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert proc.returncode == 0  # SIGTERM: clean stop
    text = (tmp_path / "node.log").read_text()
    assert "DEMO" in text and "Traceback" not in text
