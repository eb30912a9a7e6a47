"""The first hour of a new user, in a real browser: the node started exactly as `make run`
starts it (the Makefile's own command line, the shipped config/node.yaml, the relative data
dir ``var`` of that file, the working directory the checkout), phantoms sent with DCMTK
``storescu``, and the dashboard in headless Chromium: ``/`` leads to the login, and every
``<img>`` of the overview, the study pages and the evaluation page has loaded.

Two things differ from `make run`, through the environment (never the config file):
* ``CXR_NODE__DICOM__PORT`` / ``CXR_NODE__WEB__PORT``: free ports, because 11112 and 8080
  may be taken on a test machine (a running node, a parallel test);
* ``CXR_NODE__MODELS__DEMO_BUILD=quick``: the same two demo bundles (classifier and nodule
  detector), trained in seconds instead of minutes; and they are already in ``var``, as on
  every start after the first (the session's quick build, copied: the first start's build is
  tests/e2e/test_readme_path.py's and test_make_demo.py's).
The working directory is a fresh folder holding a copy of config/ (the code comes from this
checkout through PYTHONPATH), so ``var`` is relative to it, as it is to the checkout for
`make run`, and nothing is left in the checkout.

The shipped configuration has no evaluation job, so the evaluation history of the two demo
models (one run a day, both measuring "nodule") is recorded into the node's database, as
the dashboard test does; the page, its plots and their routes are the node's own.

Screenshots: test-artifacts/screenshots/make-run-{login,overview,study-1,study-2,
evaluation}.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, free_port, storescu, wait_for_port, wait_until
from helpers.browser import all_images_loaded, browser, loaded, shoot
from helpers.demo_build import Build

from dicom_node.store import db

sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "web"))
from webdata import insert_run  # noqa: E402 - the web tests' helper for history rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "demo-reference"


def make_run_command() -> list[str]:
    """The `make run` recipe of the Makefile, with its variables filled in and the venv's
    console script as this interpreter's ``-m dicom_node`` (the same entry point)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^run:.*\n\t(.+)$", text, re.MULTILINE)
    config = re.search(r"^CONFIG \?= (\S+)$", text, re.MULTILINE)
    assert recipe and config, "Makefile: no `run` recipe or CONFIG default"
    argv = recipe.group(1).replace("$(CONFIG)", config.group(1)).split()
    assert argv[:2] == ["$(BIN)/dicom-node", "serve"], argv
    return [sys.executable, "-m", "dicom_node", *argv[1:]]


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"node exited:\n{log.read_text()[-3000:]}"
        try:
            return requests.get(f"{base}/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, 420, interval=1, what="demo bundles built (quick) and loaded (/readyz)")


def _send_phantoms(port: int, folder: Path) -> list[Path]:
    from training.synth import make_dataset

    files = []
    folder.mkdir(parents=True, exist_ok=True)
    for seed, variant in ((21, "dx_mono2_explicit"), (22, "cr_mono1_jpeg_lossless")):
        path = folder / f"{seed}.dcm"
        make_dataset(variant, seed=seed, rows=640, columns=560,
                     findings={"nodule": True}).save_as(path, enforce_file_format=True)
        res = storescu(port, [path])
        assert res.returncode == 0, res.stderr
        files.append(path)
    return files


def _record_history(data_dir: Path, models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Three daily runs of both demo models (every label each has); returns the (model,
    label) pairs, one trend plot each."""
    per_model = {(m["name"], m["version"]): [label["name"] for label in m["labels"]]
                 for m in models}
    engine = db.make_engine(f"sqlite:///{data_dir / 'node.db'}")
    try:
        now = time.time()
        for days, sens, spec in ((3, 0.9, 0.6), (2, 0.85, 0.7), (1, 0.95, 0.65)):
            figures = {key: {label: (sens, spec - 0.02 * i) for label in labels}
                       for i, (key, labels) in enumerate(per_model.items())}
            first, *rest = figures
            insert_run(engine, JOB, now - days * 86400, figures[first], model=first,
                       more_models={key: figures[key] for key in rest})
    finally:
        engine.dispose()
    return sorted((name, label) for (name, _), labels in per_model.items() for label in labels)


def _log_in(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/")  # the README's address, no session
    wait_until(lambda: driver.current_url == f"{base}/dashboard/login", 10,
               what="/ leads to the login page")
    assert driver.find_element(By.ID, "token").is_displayed()
    shoot(driver, "make-run-login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_until(lambda: driver.current_url == f"{base}/dashboard/", 10, what="overview")
    assert token not in driver.current_url


def _browse(driver: Any, base: str, token: str, series: list[tuple[str, str]]) -> None:
    from selenium.webdriver.common.by import By

    _log_in(driver, base, token)
    all_images_loaded(driver, "overview")  # it has none today; none may be broken
    assert "cxr-demo-classifier" in driver.find_element(By.TAG_NAME, "main").text
    shoot(driver, "make-run-overview")

    driver.get(f"{base}/dashboard/studies")
    links = [a.get_attribute("href") for a in
             driver.find_elements(By.CSS_SELECTOR, "table.studies a")]
    assert len(links) == 2, links
    for n, link in enumerate(links, 1):
        driver.get(link)
        count = all_images_loaded(driver, f"study {n}")
        assert loaded(driver, "img.original") == 1 and loaded(driver, "img.overlay") >= 1
        assert count == loaded(driver, "img.original") + loaded(driver, "img.overlay")
        models = {td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.model")}
        assert models and all(m.endswith("(DEMO, not for clinical use)") for m in models), models
        shoot(driver, f"make-run-study-{n}")

    driver.get(f"{base}/dashboard/evaluation")
    count = all_images_loaded(driver, "evaluation")
    assert loaded(driver, "img.roc") == 1 and count == 1 + len(series)
    alts = [i.get_attribute("alt") for i in driver.find_elements(By.CSS_SELECTOR, "img.history")]
    assert alts == [f"{model} / {label} over time" for model, label in series]
    shoot(driver, "make-run-evaluation")


def test_make_run_then_the_dashboard_in_chromium(tmp_path: Path, quick_demo_build: Build) -> None:
    work = tmp_path / "checkout"
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copytree(quick_demo_build.out, work / "var" / "models" / "demo")
    port, web = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE__")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                "CXR_NODE__DICOM__PORT": str(port), "CXR_NODE__WEB__PORT": str(web),
                "CXR_NODE__MODELS__DEMO_BUILD": "quick"})
    log = tmp_path / "node.log"
    base = f"http://127.0.0.1:{web}"
    with log.open("wb") as out:
        proc = subprocess.Popen(make_run_command(), cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    driver = None
    try:
        wait_for_port(port, timeout=90)
        _wait_ready(base, proc, log)
        data = work / "var"  # storage.data_dir: var, against the working directory
        token = (data / "api-token").read_text(encoding="ascii").strip()
        auth = {"Authorization": f"Bearer {token}"}
        _send_phantoms(port, tmp_path / "in")

        def analysed() -> bool:
            items = requests.get(f"{base}/api/v1/studies", headers=auth, timeout=10).json()
            return len(items["items"]) == 2 and all(s["status"] == "analysed"
                                                   for s in items["items"])

        wait_until(analysed, 240, interval=1, what="both studies analysed")
        models = requests.get(f"{base}/api/v1/models", headers=auth, timeout=10).json()
        assert len(models["items"]) == 2, models
        series = _record_history(data, models["items"])

        api = requests.get(f"{base}/", timeout=10, allow_redirects=False)  # curl: */*
        assert api.status_code == 401 and api.json()["error"]["code"] == "unauthorized"
        driver = browser(tmp_path / "chromium-profile")
        _browse(driver, base, token, series)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(60)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "unhandled" not in text, text[-3000:]
    assert not (ROOT / "dicom_node" / "web" / "var").exists()
