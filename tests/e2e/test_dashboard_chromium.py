"""The dashboard in a real browser: headless Debian Chromium driven by Selenium and
chromium-driver, against a node (real tiny model) that received phantom studies over DICOM
and ran a real evaluation job. Screenshots of each page go to test-artifacts/screenshots/."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from conftest import ROOT, StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.browser import browser, loaded, shoot
from helpers.node import node_settings, start_node

from dicom_node.analysis import load_analyzer

sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "web"))
from webdata import insert_run  # noqa: E402 - the web tests' helper for history rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-dashboard-token-0123456789abcdef"
JOB = "phantom-reference"


def _reference_set(root: Path) -> tuple[Path, Path]:
    """Eight labelled phantoms (four with a nodule) in the CSV format ``training`` reads."""
    from training.synth import make_dataset

    rows = []
    for i in range(8):
        findings = {"nodule": i % 2 == 0, "cardiomegaly": i % 4 == 1}
        ds = make_dataset("dx_mono2_explicit", seed=100 + i, rows=256, columns=256,
                          findings=findings)
        path = root / f"case{i}.dcm"
        root.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append({"sop_instance_uid": ds.SOPInstanceUID, "nodule": int(findings["nodule"]),
                     "cardiomegaly": int(findings["cardiomegaly"]), "pneumothorax": 0})
    labels = root / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root, labels


@pytest.fixture
def node(tmp_path: Path, tiny_bundle: Path) -> Iterator[Any]:
    dest = StoreSCP(tmp_path / "dest", free_port())
    ref_dir, labels = _reference_set(tmp_path / "refset")
    settings = node_settings(
        tmp_path / "node", quiet=0.3, destinations=[dest.destination, f"GONE@127.0.0.1:{free_port()}"],
        **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
           "sender.max_attempts": 1, "web.enabled": True, "web.port": free_port(),
           "web.token": TOKEN, "evaluation.jobs": [{
               "name": JOB, "kind": "reference",
               "reference": {"dicom_dir": str(ref_dir), "labels_csv": str(labels)},
               "floors": {"nodule": {"sensitivity": 0.8, "specificity": 0.6}}}]})
    n = start_node(settings, load_analyzer)
    wait_for_port(settings.web.port)
    yield n
    n.stop()
    dest.stop()


def _send_phantoms(node: Any, folder: Path) -> list[str]:
    from training.synth import make_dataset

    studies = []
    for seed, variant in ((11, "dx_mono2_explicit"), (12, "cr_mono1_jpeg_lossless")):
        ds = make_dataset(variant, seed=seed, rows=640, columns=560,
                          findings={"nodule": True})
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        res = storescu(node.settings.dicom.port, [path])
        assert res.returncode == 0, res.stderr
        studies.append(str(ds.StudyInstanceUID))
    return studies


def _api(node: Any, method: str, url: str, **kwargs: Any) -> Any:
    resp = requests.request(method, f"http://127.0.0.1:{node.settings.web.port}{url}",
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, **kwargs)
    assert resp.status_code < 300, resp.text
    return resp.json()


def _prepare(node: Any, tmp_path: Path) -> None:
    """Two phantom studies analysed and delivered (one destination down: dead letters), a
    history of older runs, and a real evaluation run through the node's service."""
    studies = _send_phantoms(node, tmp_path / "in")
    def settled() -> bool:
        items = _api(node, "GET", "/api/v1/studies")["items"]
        return len(items) == len(studies) and all(s["status"] == "dead_letter" for s in items)

    wait_until(settled, 90, what="studies analysed, deliveries settled")
    now = time.time()
    model = next((m.name, m.version) for m in node.analyzer.models)  # the same model's past
    for days, (sens, spec) in ((9, (0.95, 0.7)), (6, (0.9, 0.66)), (3, (0.85, 0.62))):
        insert_run(node.engine, JOB, now - days * 86400,
                   {"nodule": (sens, spec), "cardiomegaly": (0.8, 0.9)}, model=model)
    run_id = _api(node, "POST", "/api/v1/evaluations/runs", json={"job": JOB})["run_id"]
    wait_until(lambda: _api(node, "GET", f"/api/v1/evaluations/runs/{run_id}")["state"]
               != "running", 90, what="evaluation run")
    run = _api(node, "GET", f"/api/v1/evaluations/runs/{run_id}")
    assert run["state"] == "succeeded", run["error"]


def test_dashboard_pages_in_chromium(node: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _prepare(node, tmp_path)
    base = f"http://127.0.0.1:{node.settings.web.port}"
    driver = browser(tmp_path / "chromium-profile")
    try:
        driver.get(f"{base}/dashboard/")  # no session: the login form
        assert driver.current_url.endswith("/dashboard/login")
        shoot(driver, "login")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        wait_until(lambda: driver.current_url.endswith("/dashboard/"), 10, what="overview")
        assert TOKEN not in driver.current_url

        overview = driver.find_element(By.TAG_NAME, "main").text
        assert "Throughput" in overview and "Evaluation alerts" in overview
        assert "nodule" in driver.find_element(By.ID, "alerts").text  # specificity < floor
        shoot(driver, "overview")

        driver.get(f"{base}/dashboard/studies")
        links = driver.find_elements(By.CSS_SELECTOR, "table.studies a")
        assert len(links) == 2
        patient = pydicom.dcmread(tmp_path / "in" / "11.dcm", stop_before_pixels=True)
        assert str(patient.PatientID) in driver.page_source  # shown behind the login only
        shoot(driver, "studies")

        links[-1].click()
        wait_until(lambda: "/dashboard/studies/" in driver.current_url, 10, what="study page")
        rows = driver.find_elements(By.CSS_SELECTOR, "table.findings tr")
        assert len(rows) >= 4 and "nodule" in rows[1].text and "%" in rows[1].text
        wait_until(lambda: loaded(driver, "img.overlay") == 1
                   and loaded(driver, "img.original") == 1, 20, what="images loaded")
        assert driver.find_elements(By.CSS_SELECTOR, "button.resubmit")  # dead letters
        assert "(DEMO, not for clinical use)" in driver.find_element(
            By.CSS_SELECTOR, "table.findings td.model").text  # named as the SR names it
        shoot(driver, "study")

        driver.find_element(By.CSS_SELECTOR, "button.resubmit").click()
        wait_until(lambda: "queued again" in driver.page_source, 10, what="resubmit")

        assert requests.get(f"{base}/api/v1/studies", timeout=10,
                            headers={"Authorization": "Bearer wrong"}).status_code == 403
        driver.get(f"{base}/dashboard/audit")
        assert "node started" in driver.find_element(By.ID, "audit-events").text
        Select(driver.find_element(By.ID, "audit-kind")).select_by_value("login_failed")
        driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
        wait_until(lambda: "kind=login_failed" in driver.current_url, 10, what="audit filter")
        events = driver.find_element(By.ID, "audit-events").text
        assert "wrong bearer token" in events and "127.0.0.1" in events
        assert "node started" not in events and "wrong" not in driver.current_url
        shoot(driver, "audit")

        driver.get(f"{base}/dashboard/evaluation")
        wait_until(lambda: loaded(driver, "img.history") == 3 and loaded(driver, "img.roc")
                   == 1, 30, what="evaluation plots")
        assert driver.find_elements(By.CSS_SELECTOR, "table.confusion")
        shoot(driver, "evaluation")
        for url in (e.get_attribute("src") for e in driver.find_elements(By.TAG_NAME, "img")):
            assert "1.2." not in (url or "") and TOKEN not in (url or "")
    finally:
        driver.quit()
