"""STOW-RS delivery into a real Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb),
HTTP basic auth on: results stored and found by QIDO-RS, wrong credentials dead at once with
a clear reason (and resubmitted once fixed), an Orthanc that is down retried until it is
back, and the full node path (Orthanc auto-routes a phantom study to the node, the node
answers by STOW-RS). The answers Orthanc cannot give (a per-object Failed SOP Sequence) come
from a loopback HTTP server speaking the same protocol."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from conftest import free_port, require_tool, wait_until
from helpers.node import node_settings, start_node
from helpers.orthanc import start_orthanc
from helpers.results import ResultBench
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.analysis import load_analyzer
from dicom_node.delivery.ledger import resubmit
from dicom_node.store.states import DeliveryState

pytestmark = pytest.mark.integration

USER, PASSWORD = "cxr-node", "stow-secret-4711"
LATER = 10_000.0  # a clock past every backoff


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Any]:
    server = start_orthanc(tmp_path / "orthanc", free_port(), stable_age=3600, dicomweb=True,
                           users={USER: PASSWORD})
    yield server
    server.stop()


def _stow(pacs_url: str, password_env: str = "CXR_TEST_STOW_PASSWORD") -> dict[str, Any]:
    return {"type": "stow-rs", "url": f"{pacs_url}/dicom-web/", "timeout_s": 10,
            "auth": {"type": "basic", "username": USER, "password_env": password_env}}


def _qido_instances(pacs: Any, study_uid: str) -> set[str]:
    r = requests.get(f"{pacs.url}/dicom-web/studies/{study_uid}/instances",
                     auth=(USER, PASSWORD), headers={"Accept": "application/dicom+json"},
                     timeout=10)
    if r.status_code == 204 or not r.content:
        return set()
    r.raise_for_status()
    return {str(Dataset.from_json(i).SOPInstanceUID) for i in r.json()}


def test_results_stored_by_stow_rs_found_by_qido(pacs: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", PASSWORD)
    bench = ResultBench(tmp_path / "node", [_stow(pacs.url)])
    try:
        study = bench.study(seed=1)
        caplog.set_level(logging.DEBUG)
        assert bench.sender().run_once() == 3
        rows = bench.deliveries(study)
        assert {k: (r.state, r.attempts, r.last_error) for k, r in rows.items()} == {
            k: (DeliveryState.SENT, 1, None) for k in ("sr", "sc", "gsps")}
        assert all(r.destination == f"stow-rs:{pacs.url}/dicom-web" for r in rows.values())
        assert _qido_instances(pacs, study) == {r.sop_instance_uid for r in rows.values()}
        # Orthanc's own REST API agrees, and the files are the node's, byte for byte
        for r in rows.values():
            [orthanc_id] = [h["ID"] for h in pacs.rest("/tools/lookup", "POST",
                                                       data=r.sop_instance_uid)]
            stored = pacs.rest(f"/instances/{orthanc_id}/file", raw=True)
            assert stored == (bench.spool.path(r.path)).read_bytes()
        assert {e.subject for e in bench.audit("delivered")} == {
            r.sop_instance_uid for r in rows.values()}
        assert PASSWORD not in caplog.text
    finally:
        bench.close()


def test_wrong_password_is_dead_at_once_then_resubmitted(pacs: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", "wrong-password-0815")
    bench = ResultBench(tmp_path / "node", [_stow(pacs.url)])
    try:
        study = bench.study(seed=2)
        caplog.set_level(logging.DEBUG)
        sender = bench.sender()
        assert sender.run_once() == 0
        name = f"stow-rs:{pacs.url}/dicom-web"
        for r in bench.deliveries(study).values():
            assert (r.state, r.attempts) == (DeliveryState.DEAD, 1)
            assert r.last_error == (f"{name} answered HTTP 401 Unauthorized: check the "
                                    "destination's auth (user name, token or password variable)")
        assert sender.run_once(time.time() + LATER) == 0  # dead stays dead: no loop
        assert len(bench.audit("dead_lettered")) == 3
        assert "wrong-password-0815" not in caplog.text
        assert _qido_instances(pacs, study) == set()
        # the operator fixes the secret (a restart reads it) and resubmits
        monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", PASSWORD)
        fixed = ResultBench(tmp_path / "node", [_stow(pacs.url)])
        try:
            assert resubmit(fixed.engine, destination=name) == 3
            assert fixed.sender().run_once() == 3
            assert {r.state for r in fixed.deliveries(study).values()} == {DeliveryState.SENT}
            assert len(_qido_instances(pacs, study)) == 3
        finally:
            fixed.close()
    finally:
        bench.close()


def test_orthanc_down_is_retried_until_it_is_back(pacs: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", PASSWORD)
    bench = ResultBench(tmp_path / "node", [_stow(pacs.url)])
    try:
        study = bench.study(seed=3)
        pacs.stop()
        sender = bench.sender(max_attempts=5)
        assert sender.run_once() == 0
        rows = bench.deliveries(study)
        assert {r.state for r in rows.values()} == {DeliveryState.RETRYING}
        assert all("connection failed: ConnectionError" in r.last_error for r in rows.values())
        assert all(PASSWORD not in r.last_error for r in rows.values())
        pacs.start()  # the same port, the same storage
        assert sender.run_once(time.time() + LATER) == 3
        rows = bench.deliveries(study)
        assert {(r.state, r.attempts) for r in rows.values()} == {(DeliveryState.SENT, 2)}
        assert len(_qido_instances(pacs, study)) == 3
    finally:
        bench.close()


class _PartialStow(BaseHTTPRequestHandler):
    """A STOW-RS server that refuses GSPS (Failed SOP Sequence, 0x0122), is out of
    resources for the SC (0xA700, HTTP 202) and stores the SR with a coercion warning."""

    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
            body[body.index(b"\r\n\r\n") + 4:]), force=True)
        type(self).received.append(str(ds.SOPInstanceUID))
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, \
            ds.SOPInstanceUID
        answer = Dataset()
        answer.ReferencedSOPSequence, answer.FailedSOPSequence = Sequence(), Sequence()
        modality, status = str(ds.get("Modality", "")), 200
        if modality == "PR":
            item.FailureReason, status = 0x0122, 409
            answer.FailedSOPSequence.append(item)
        elif modality == "OT":
            item.FailureReason, status = 0xA700, 202
            answer.FailedSOPSequence.append(item)
        else:
            item.WarningReason, status = 0xB000, 202
            answer.ReferencedSOPSequence.append(item)
        data = json.dumps(answer.to_json_dict()).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_per_object_failures_from_a_stow_rs_server(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PartialStow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    bench = ResultBench(tmp_path / "node", [
        {"type": "stow-rs", "url": f"http://127.0.0.1:{server.server_port}/dicom-web",
         "name": "partial"}])
    try:
        study = bench.study(seed=4)
        sender = bench.sender(max_attempts=2)
        assert sender.run_once() == 1
        rows = bench.deliveries(study)
        assert (rows["sr"].state, rows["sr"].last_status) == (DeliveryState.SENT, 0xB000)
        assert rows["sr"].last_error == "stored with warning: status 0xB000 (coercion of " \
                                        "data elements)"
        assert (rows["gsps"].state, rows["gsps"].last_status) == (DeliveryState.NOT_ACCEPTED,
                                                                  0x0122)
        assert rows["gsps"].last_error.startswith("not accepted by partial: Grayscale "
                                                  "Softcopy Presentation State Storage")
        assert (rows["sc"].state, rows["sc"].last_status) == (DeliveryState.RETRYING, 0xA700)
        # out of resources is never dead-lettered: retried past max_attempts
        for _ in range(3):
            sender.run_once(time.time() + LATER)
        assert bench.deliveries(study)["sc"].state == DeliveryState.RETRYING
        assert bench.deliveries(study)["sc"].attempts == 4
        assert not [r for r in bench.rows() if r.state == DeliveryState.SENDING]
    finally:
        bench.close()
        server.shutdown()
        server.server_close()


def _self_signed(d: Path) -> tuple[Path, Path]:
    cert, key = d / "stow-cert.pem", d / "stow-key.pem"
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_verification_with_the_configured_ca_file(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PartialStow)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_port}/dicom-web"
    untrusted = ResultBench(tmp_path / "a", [{"type": "stow-rs", "url": url}])
    trusted = ResultBench(tmp_path / "b", [{"type": "stow-rs", "url": url,
                                            "ca_file": str(cert)}])
    try:
        study = untrusted.study(seed=5)
        assert untrusted.sender().run_once() == 0
        rows = untrusted.deliveries(study)
        assert {r.state for r in rows.values()} == {DeliveryState.RETRYING}
        assert "TLS handshake or certificate verification failed: SSLError" in \
            rows["sr"].last_error
        study = trusted.study(seed=5)
        assert trusted.sender().run_once() == 1  # the SR; GSPS refused, SC out of resources
        assert trusted.deliveries(study)["sr"].state == DeliveryState.SENT
    finally:
        untrusted.close()
        trusted.close()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_node_answers_an_auto_routed_study_by_stow_rs(tmp_path: Path, tiny_bundle: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from training.synth import make_dataset

    monkeypatch.setenv("CXR_TEST_STOW_PASSWORD", PASSWORD)
    node_port, web_port = free_port(), free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port, stable_age=1, dicomweb=True,
                         users={USER: PASSWORD})
    node = None
    try:
        settings = node_settings(
            tmp_path / "node", destinations=[_stow(pacs.url)],
            **{"dicom.port": node_port, "models.bundles": [str(tiny_bundle)],
               "models.device": "cpu", "web.enabled": True, "web.port": web_port,
               "web.token": "t0ken"})
        node = start_node(settings, load_analyzer)
        path = tmp_path / "in.dcm"
        make_dataset("dx_mono1_j2k", seed=11, rows=300, columns=280).save_as(
            path, enforce_file_format=True)
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        pacs.upload(path)
        wait_until(lambda: len(_qido_instances(pacs, study_uid)) >= 4, 60, interval=0.5,
                   what="SR, SC and GSPS stored in Orthanc by STOW-RS")
        orthanc_study = pacs.find_study(study_uid)
        assert sorted(s["MainDicomTags"]["Modality"] for s in
                      pacs.study_series(orthanc_study)) == ["DX", "OT", "PR", "SR"]
        api = requests.get(f"http://127.0.0.1:{web_port}/api/v1/deliveries",
                           headers={"Authorization": "Bearer t0ken"}, timeout=10)
        api.raise_for_status()
        assert PASSWORD not in api.text and USER not in api.text
        names = {d["destination"] for d in api.json()["items"]}
        assert names == {f"stow-rs:{pacs.url}/dicom-web"}
        assert {d["state"] for d in api.json()["items"]} == {"sent"}
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
