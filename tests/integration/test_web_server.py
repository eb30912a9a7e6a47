"""The web server inside a running node: real HTTP on loopback, token file, readiness,
the evaluation service wired through the node, and a clean stop."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_for_port, wait_until
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, start_node

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = node_settings(tmp_path / "node", **{"web.enabled": True,
                                                   "web.port": free_port()})
    n = start_node(settings, lambda s: FakeAnalyzer())
    wait_for_port(settings.web.port)
    yield n
    n.stop()


def test_served_on_loopback_with_the_generated_token(node) -> None:  # type: ignore[no-untyped-def]
    base = f"http://127.0.0.1:{node.settings.web.port}"
    assert node.web.host == "127.0.0.1"  # the default bind
    token_file = node.settings.storage.data_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    ready = wait_until(lambda: (r := requests.get(f"{base}/readyz", timeout=5)).status_code
                       == 200 and r, 20, what="ready")
    assert ready.json()["checks"] == {"listener": "up", "model": "loaded", "database": "up",
                                      "disk": "ok"}
    assert requests.get(f"{base}/api/v1/studies", timeout=5).status_code == 401
    assert requests.get(f"{base}/api/v1/studies", timeout=5,
                        headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {token}"}
    models = requests.get(f"{base}/api/v1/models", headers=auth, timeout=5).json()
    assert models["loaded"] and models["items"][0]["name"] == "fake-model"
    metrics = requests.get(f"{base}/metrics", headers=auth, timeout=5)
    assert "cxr_model_loaded 1" in metrics.text and "cxr_dicom_listener_up 1" in metrics.text
    # the node's evaluation service answers through the API (no job configured here)
    missing = requests.post(f"{base}/api/v1/evaluations/runs", json={"job": "nightly"},
                            headers=auth, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_stop_closes_the_port(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "node", **{"web.enabled": True, "web.port": free_port(),
                                                   "web.token": "x" * 32})
    n = start_node(settings, lambda s: FakeAnalyzer())
    wait_for_port(settings.web.port)
    n.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", settings.web.port)) != 0
