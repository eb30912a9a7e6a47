"""Dashboard pages through the Flask test client: what each page shows, patient names only
behind the login, no identifier in any URL, thumbnails and plots as PNG."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import update
from webdata import CANARY, WebData, WebEnv, csrf, login, web_settings

from dicom_node.store import db
from dicom_node.web import create_app

pytest_plugins = ["webfixtures"]

HREF = re.compile(r'(?:href|src|action)="([^"]+)"')


def png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


@pytest.fixture
def session(web_env: WebEnv) -> WebEnv:
    login(web_env)
    return web_env


def test_pages_show_patient_names_only_after_login(web_env: WebEnv) -> None:
    anonymous = web_env.client.get("/dashboard/studies")
    assert anonymous.status_code == 302 and CANARY["PatientID"] not in anonymous.text
    login(web_env)
    page = web_env.client.get("/dashboard/studies")
    assert page.status_code == 200
    assert "Zyx Canaryweb" in page.text and CANARY["PatientID"] in page.text


def test_no_identifier_in_any_url(session: WebEnv) -> None:
    for url in ("/dashboard/", "/dashboard/studies", "/dashboard/studies/1",
                "/dashboard/evaluation"):
        page = session.client.get(url)
        assert page.status_code == 200, url
        for link in HREF.findall(page.text):
            assert not re.search(r"\d+\.\d+\.\d+\.", link), link  # no UID
            for value in CANARY.values():
                assert value not in link, link


def test_overview(session: WebEnv) -> None:
    page = session.client.get("/dashboard/").text
    for text in ("Throughput", "Queue", "dead-letter deliveries", "Evaluation alerts",
                 "1 active", "Recent studies"):
        assert text in page, text
    assert re.search(r"images received</td><td class=\"num\">5<", page)
    assert re.search(r"not accepted by a destination</td><td class=\"num\">1<", page)
    assert re.search(r"objects to send</td><td class=\"num\">1<", page)  # retrying


def test_studies_list_filters_and_paging(session: WebEnv) -> None:
    page = session.client.get("/dashboard/studies?state=failed").text
    assert page.count('href="/dashboard/studies/') == 1
    empty_fields = session.client.get("/dashboard/studies?state=&modality=&received_from=")
    assert empty_fields.status_code == 200  # what the filter form sends
    first = session.client.get("/dashboard/studies?limit=2").text
    assert "older →" in first and "1–2 of 4" in first
    bad = session.client.get("/dashboard/studies?received_from=soon")
    assert bad.status_code == 400 and "text/html" in bad.content_type


def test_study_page(session: WebEnv) -> None:
    page = session.client.get("/dashboard/studies/1").text
    assert CANARY["AccessionNumber"] in page and "1902-03-04" in page  # birth date, shown
    assert page.count('class="original"') == 2 and page.count('class="overlay"') == 2
    assert re.search(r"<td>nodule</td>.*?90\.0 %.*?50\.0 %", page, re.S)
    assert page.count("Resubmit</button>") == 2 and "Re-analyse" in page  # dead, not accepted
    assert "Comprehensive SR Storage" in page and "0xA700" in page and "RLE Lossless" in page
    assert '<span class="badge s-not_accepted">not accepted</span>' in page
    failed = session.client.get("/dashboard/studies/4").text  # 4: the failed study's image
    assert "model exploded on [redacted]" in failed


def _model_cells(page: str) -> list[str]:
    return re.findall(r'<td class="small model">([^<]*)</td>', page)


def test_study_page_names_the_model_as_the_sr_does(ready_env: WebEnv, web_env: WebEnv) -> None:
    login(ready_env)  # the node's loaded (fake, demo) model: its display name, DEMO included
    cells = _model_cells(ready_env.client.get("/dashboard/studies/1").text)
    assert cells and set(cells) == {"fake-model 1.0 (DEMO, not for clinical use)"}
    login(web_env)  # no node and no bundle: the worker recorded that the model was a demo
    assert set(_model_cells(web_env.client.get("/dashboard/studies/1").text)) == {
        "fake-model 1.0 (DEMO, not for clinical use)"}
    with web_env.engine.begin() as conn:  # rows of older versions recorded no flag:
        conn.execute(update(db.findings).values(model_demo=None))  # name and version only
    assert set(_model_cells(web_env.client.get("/dashboard/studies/1").text)) == {
        "fake-model 1.0"}


def test_thumbnails_are_cached_pngs(session: WebEnv) -> None:
    original = png(session.client.get("/dashboard/instances/1/image.png").data)
    assert original.ndim == 2 and max(original.shape) <= 512
    overlay_ids = re.findall(r"/dashboard/outputs/(\d+)/image.png",
                             session.client.get("/dashboard/studies/1").text)
    overlay = png(session.client.get(f"/dashboard/outputs/{overlay_ids[0]}/image.png").data)
    assert overlay.ndim == 3 and overlay.shape[:2] == original.shape
    thumbs = session.settings.storage.data_dir / "thumbs"
    assert len(list(thumbs.glob("*.png"))) == 2
    assert session.client.get("/dashboard/outputs/1/image.png").status_code == 404  # the SR
    assert session.client.get("/dashboard/instances/999/image.png").status_code == 404


def test_images_load_with_the_shipped_relative_data_dir(
        web_template: tuple[Path, WebData], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``storage.data_dir: var`` (config/node.yaml) with the working directory elsewhere
    than the package: send_file must get absolute paths (it took them relative to the
    package folder and answered 500)."""
    source, data = web_template
    monkeypatch.chdir(tmp_path)
    shutil.copytree(source, tmp_path / "var", ignore=shutil.ignore_patterns("thumbs"))
    settings = web_settings(Path("var"))
    assert settings.storage.data_dir == tmp_path / "var"
    engine = db.make_engine(settings.database_url)
    try:
        app = create_app(settings, engine=engine, testing=True)
        env = WebEnv(settings, engine, app, app.test_client(), data)
        login(env)
        page = env.client.get("/dashboard/studies/1").text
        urls = re.findall(r'<img class="(?:original|overlay)" src="([^"]+)"', page)
        assert len(urls) == 4
        for url in urls:
            resp = env.client.get(url)
            assert resp.status_code == 200, url
            png(resp.data)
    finally:
        engine.dispose()


def test_dashboard_actions(session: WebEnv) -> None:
    page = session.client.get("/dashboard/studies/1").text
    token = csrf(page)
    done = session.client.post("/dashboard/studies/1/reanalyse", data={"csrf_token": token},
                               follow_redirects=True)
    assert "Re-analysis requested as job 3" in done.text
    again = session.client.post("/dashboard/studies/1/reanalyse", data={"csrf_token": token},
                                follow_redirects=True)
    assert "re-analysed once it is" in again.text
    run = session.client.post("/dashboard/evaluation/runs",
                              data={"csrf_token": token, "job": "nightly-reference"},
                              follow_redirects=True)
    assert "evaluation jobs are not running" in run.text


def test_evaluation_page_and_plots(session: WebEnv) -> None:
    page = session.client.get("/dashboard/evaluation").text
    assert 'class="confusion"' in page and "sens ≥ 0.8" in page
    assert "Grad-CAM hit rate / in lungs" in page  # null for labels without locations
    assert re.search(r'class="num localisation">0\.89 \(16/18\) / 0\.71<', page), page
    assert page.count('class="history"') == 2 and 'class="roc"' in page
    assert "reference dicom_dir missing" in page  # the failed run and why
    history = png(session.client.get("/dashboard/evaluation/history.png?label=nodule&"
                                      "job=nightly-reference").data)
    assert history.shape[1] > history.shape[0] > 200
    roc_url = re.search(r'src="(/dashboard/evaluation/runs/\d+/roc.png)"', page).group(1)  # type: ignore[union-attr]
    png(session.client.get(roc_url).data)
    empty = session.client.get("/dashboard/evaluation/history.png?label=unknown")
    png(empty.data)
    assert session.client.get("/dashboard/evaluation/history.png").status_code == 400
    other = session.client.get("/dashboard/evaluation?job=live-confirmed").text
    assert "no succeeded run yet" in other
