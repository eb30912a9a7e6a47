"""The web front end cannot starve the node: 200 slow clients (half a request line, then
silence) hold sockets, not threads; a real client is served within a short timeout, the
DICOM listener answers echoscu and storescu, and the thread count stays bounded. Stalled
clients are dropped after the channel timeout; oversized bodies are refused; web.port 0
reports the bound port; stop closes every connection."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import require_tool, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.hostile import stalled_clients
from helpers.node import node_settings, start_node

from dicom_node.service import Node

pytestmark = pytest.mark.integration

TOKEN = "slow-client-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW_CLIENTS = 200


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    overrides = {"web.enabled": True, "web.port": 0, "web.token": TOKEN, "web.threads": 4,
                 **getattr(request, "param", {})}
    n = start_node(node_settings(tmp_path / "node", **overrides), lambda s: FakeAnalyzer())
    yield n
    n.stop()


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_clients_do_not_starve_web_or_dicom(node: Node, tmp_path: Path) -> None:
    assert node.settings.web.port == 0 and node.web.port > 0  # the bound port is reported
    base = f"http://127.0.0.1:{node.web.port}"
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    threads_before = threading.active_count()
    socks = stalled_clients(node.web.port, SLOW_CLIENTS)
    try:
        started = time.monotonic()
        assert requests.get(f"{base}/healthz", timeout=2).json() == {"status": "ok"}
        api = requests.get(f"{base}/api/v1/studies", headers=AUTH, timeout=2)
        assert api.status_code == 200 and api.json()["total"] == 0
        served_in = time.monotonic() - started
        echo = subprocess.run([require_tool("echoscu"), "-aec", "CXR_AI", "-aet", "PACS",
                               "-to", "5", "127.0.0.1", str(node.settings.dicom.port)],
                              capture_output=True, text=True, timeout=20)
        assert echo.returncode == 0, echo.stderr
        sent = storescu(node.settings.dicom.port, [write(make_image(), tmp_path / "in")],
                        extra=["-to", "5"], timeout=30)
        assert sent.returncode == 0, sent.stderr
        # the stalled clients still hold their sockets (nothing was dropped to serve us)
        assert not any(closed_by_server(s) for s in socks[:20])
        threads_during = threading.active_count()
    finally:
        for s in socks:
            s.close()
    assert served_in < 2.0
    # waitress: a fixed pool (web.threads) plus its loop; no thread per connection
    assert threads_during - threads_before <= 3, (threads_before, threads_during)


@pytest.mark.parametrize("node", [{"web.channel_timeout_s": 2,
                                   "web.max_request_body_bytes": 1024}], indirect=True)
def test_stalled_clients_are_dropped_and_large_bodies_refused(node: Node) -> None:
    socks = stalled_clients(node.web.port, 5)
    try:
        wait_until(lambda: all(closed_by_server(s) for s in socks), 15,
                   what="stalled clients dropped after web.channel_timeout_s")
    finally:
        for s in socks:
            s.close()
    big = requests.post(f"http://127.0.0.1:{node.web.port}/api/v1/deliveries/resubmit",
                        headers={**AUTH, "Content-Type": "application/json"},
                        data=b'{"destination": "' + b"x" * 4096 + b'"}', timeout=5)
    assert big.status_code == 413


def test_stop_closes_open_connections_and_the_loop(tmp_path: Path) -> None:
    node = start_node(node_settings(tmp_path / "node", **{
        "web.enabled": True, "web.port": 0, "web.token": TOKEN}), lambda s: FakeAnalyzer())
    socks = stalled_clients(node.web.port, 3)
    try:
        node.stop()
        assert all(closed_by_server(s) for s in socks)
        assert not node.web._thread.is_alive()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", node.web.port)) != 0
    finally:
        for s in socks:
            s.close()
