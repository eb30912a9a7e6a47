"""Errors are JSON (HTML on dashboard pages) with a code and a message: no stack trace, no
patient identifier, whatever went wrong (QUALITY 11)."""

from __future__ import annotations

import logging
import re

import pytest
from webdata import AUTH, CANARY, CANARY_STRINGS, WebEnv

from dicom_node.web import queries

pytest_plugins = ["webfixtures"]


def assert_clean(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text
    for canary in CANARY_STRINGS:
        assert canary not in text, canary


def test_injected_exception_is_a_clean_500(web_env: WebEnv, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"database on fire near {CANARY['PatientName']}")

    monkeypatch.setattr(queries, "list_studies", explode)
    caplog.set_level(logging.DEBUG)
    resp = web_env.get("/api/v1/studies")
    assert resp.status_code == 500 and resp.is_json
    error = resp.get_json()["error"]
    assert error["code"] == "internal_error"
    incident = re.search(r"incident (\w+)", error["message"]).group(1)  # type: ignore[union-attr]
    assert_clean(resp.text)
    assert "RuntimeError" not in resp.text and "fire" not in resp.text
    assert incident in caplog.text and "explode" in caplog.text  # the log has the frames
    for canary in CANARY_STRINGS:
        assert canary not in caplog.text  # but not the exception's message
    page = web_env.get("/dashboard/")  # the dashboard renders the same as an HTML page
    assert page.status_code == 500 and "text/html" in page.content_type
    assert_clean(page.text)



def test_a_failing_image_request_logs_one_line(web_env: WebEnv,
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``make run`` did with a relative data dir: ``send_file`` of a missing PNG
    (FileNotFoundError). At INFO: one ERROR line with the method, path, error class and
    incident; no traceback, no frames."""
    from dicom_node.web import images

    monkeypatch.setattr(images, "instance_thumbnail",
                        lambda ctx, instance_id: web_env.settings.storage.data_dir / "no.png")
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert web_env.get("/dashboard/instances/1/image.png").status_code == 500
    records = [r for r in caplog.records if r.name.startswith("dicom_node.web")]
    assert len(records) == 3, [r.getMessage() for r in records]
    for record in records:
        message = record.getMessage()
        assert record.levelno == logging.ERROR and "\n" not in message, message
        assert re.fullmatch(r"GET /dashboard/instances/1/image\.png failed: "
                            r"FileNotFoundError \(incident \w+\)", message), message
        assert record.exc_info is None
    assert "Traceback" not in caplog.text and 'File "' not in caplog.text


def test_404_405_413_415_are_json(web_env: WebEnv) -> None:
    missing = web_env.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    method = web_env.client.delete("/api/v1/studies", headers=AUTH)
    assert method.status_code == 405 and method.get_json()["error"]["code"] == (
        "method_not_allowed")
    assert "GET" in method.headers["Allow"]
    big = web_env.post("/api/v1/deliveries/resubmit", data="x" * (2 * 1024 * 1024),
                       content_type="application/json")
    assert big.status_code == 413 and big.is_json
    text = web_env.post("/api/v1/deliveries/resubmit", data="{}", content_type="text/plain")
    assert text.status_code == 415 and text.is_json
    broken = web_env.post("/api/v1/deliveries/resubmit", data="{not json",
                          content_type="application/json")
    assert broken.status_code == 400 and broken.get_json()["error"]["code"] == "invalid_body"


def test_dashboard_errors_are_pages(web_env: WebEnv) -> None:
    page = web_env.get("/dashboard/studies/999999")
    assert page.status_code == 404 and "text/html" in page.content_type
    assert "Error 404" in page.text and "study not found" in page.text


def test_no_patient_identifier_in_any_api_response(web_env: WebEnv) -> None:
    d = web_env.data
    urls = ["/api/v1/studies", "/api/v1/jobs", "/api/v1/deliveries", "/api/v1/models",
            "/metrics", "/api/v1/evaluations/jobs", "/api/v1/evaluations/runs",
            "/api/v1/evaluations/alerts", "/api/v1/evaluations/labels/nodule/history",
            f"/api/v1/evaluations/runs/{d.runs['latest']}", "/readyz", "/healthz",
            "/api/v1/jobs/1", "/api/v1/jobs/2"]
    urls += [f"/api/v1/studies/{uid}" for uid in (d.done, d.ignored, d.failed, d.receiving)]
    urls += [f"/api/v1/studies?state={CANARY['PatientName']}",  # error paths too
             f"/api/v1/studies/{CANARY['PatientID']}", f"/api/v1/jobs?study_uid={CANARY['PatientID']}",
             f"/api/v1/evaluations/labels/{CANARY['AccessionNumber']}x%3C/history",
             f"/api/v1/deliveries?destination={CANARY['PatientName']}%00"]
    for url in urls:
        resp = web_env.get(url)
        assert resp.status_code < 500 or url == "/readyz", url  # no node here: 503
        assert_clean(resp.text)
    for url, body in (("/api/v1/deliveries/resubmit", {"destination": CANARY["PatientName"]}),
                      ("/api/v1/evaluations/runs", {"job": CANARY["PatientName"]}),
                      ("/api/v1/evaluations/confirmed-labels",
                       {"key_kind": "sop", "key_uid": CANARY["PatientID"], "labels": {}}),
                      (f"/api/v1/studies/{d.done}/reanalyse", {CANARY["PatientID"]: 1})):
        resp = web_env.post(url, json=body)
        assert resp.status_code < 500, url
        assert_clean(resp.text)
