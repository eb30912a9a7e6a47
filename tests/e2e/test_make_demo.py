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


INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) (.*)$",
                       re.MULTILINE)
OWN_INFO = ("node started (pid", "Orthanc starting (pid", "Orthanc stopped")


def _demo(data_dir: Path, models: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "scripts/demo.py", "--exit-when-done", "--studies", "1",
                          "--data-dir", str(data_dir), "--models-dir", str(models),
                          "--stable-age", "1", "--timeout", "150"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "Done (--exit-when-done)." in res.stdout
    return res


def _stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_demo_builds_the_bundles_once_on_the_console_then_reuses_them(tmp_path: Path) -> None:
    """`make demo` and `make run` share one bundle folder: the first run that finds none
    builds it (stages on the console, not in a log file), every later run reuses it (no
    training step, files untouched); the console carries no urllib3 retries and no library
    INFO lines."""
    require_tool("Orthanc")
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE__")}
    env.update({"PYTHONUNBUFFERED": "1", "CXR_NODE__MODELS__DEVICE": "cpu",
                "CXR_NODE__MODELS__DEMO_BUILD": "quick"})
    first = _demo(tmp_path / "first", models, env)
    out = first.stdout
    assert f"No model yet: building the DEMO bundles into {models}" in out, out
    assert re.search(r"^\[1/2\] demo classifier .*\n(.*\n)*\[2/2\] demo nodule detector", out,
                     re.MULTILINE), out
    assert "DEMO bundles ready in" in out and "\r" not in out
    built = _stamps(models)
    assert len([p for p in built if p.name == "metadata.json"]) == 2

    second = _demo(tmp_path / "second", models, env)
    out, err = second.stdout, second.stderr
    assert f"DEMO bundles: {models} (already built, reused)" in out, out
    assert "Building the DEMO bundles" not in out and "[1/2]" not in out
    node_log = (tmp_path / "second" / "node.log").read_text(encoding="utf-8")
    assert "building the DEMO bundles" not in node_log
    assert "models loaded: cxr-demo-classifier 1.0.0-quick (DEMO, not for clinical use), " \
           "cxr-demo-detector 1.0.0-quick" in node_log, node_log
    # the worker process warmed its models before it said ready (dicom_node.warmup)
    warmed = node_log.find("warm-up: a synthetic image analysed and its outputs built in")
    assert -1 < warmed < node_log.find("models loaded: "), node_log
    assert _stamps(models) == built  # nothing rewritten
    first_result = re.search(r"first result back (\d+\.\d) s after the demo started", out)
    assert first_result, out
    print(f"\nmake demo with built bundles: first result after {first_result.group(1)} s")
    for run in (first, second):
        console = run.stdout + run.stderr
        assert "Retrying" not in console and "urllib3" not in console, console
    foreign = [m.group(0) for m in INFO_LINE.finditer(out + err)
               if m.group(1) == "INFO" and not m.group(2).startswith(OWN_INFO)
               and not re.match(r"Orthanc [\d.]+ ready$", m.group(2))]
    assert not foreign, foreign
    assert "WARNING" not in out + err, out + err


def test_make_demo_uses_the_bundle_folder_of_make_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` (data dir `var`, working directory the repository root) keeps its demo
    bundles in var/models/demo; `make demo` (data dir var/demo) looks there, not under its
    own data dir."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for name in [k for k in os.environ if k.startswith("CXR_NODE__")]:
        monkeypatch.delenv(name)
    config = ROOT / "config" / "node.yaml"
    assert demo.parse_args([]).data_dir == ROOT / "var" / "demo"
    assert demo.shared_bundle_dir(config, None) == ROOT / "var" / "models" / "demo"
    monkeypatch.setenv("CXR_NODE__MODELS__DEMO_DIR", "/srv/cxr/demo-bundles")
    assert demo.shared_bundle_dir(config, None) == Path("/srv/cxr/demo-bundles")
    assert demo.shared_bundle_dir(config, Path("/x")) == Path("/x")
