"""Optional TLS listener (QUALITY 9) against DCMTK storescu and Python clients: a trusted
client certificate is accepted; an untrusted one, none, or TLS < 1.2 is refused."""

from __future__ import annotations

import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import free_port, require_tool, wait_for_port
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from sqlalchemy import select

from dicom_node.scp import tls_context
from dicom_node.store import db

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _ca_and_cert(d: Path, name: str, ca: str | None) -> None:
    _openssl("req", "-x509" if ca is None else "-new", "-newkey", "rsa:2048", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.{'pem' if ca is None else 'csr'}",
             "-subj", f"/CN={name}", *(["-days", "2"] if ca is None else []), cwd=d)
    if ca is not None:
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", ext.name, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca_and_cert(d, "ca", None)
    _ca_and_cert(d, "rogue_ca", None)
    _ca_and_cert(d, "node", "ca")
    _ca_and_cert(d, "pacs", "ca")
    _ca_and_cert(d, "intruder", "rogue_ca")
    return d


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path):  # type: ignore[no-untyped-def]
    settings = node_settings(tmp_path / "node", **{"dicom.tls": {
        "enabled": True, "port": free_port(), "cert_file": str(pki / "node.pem"),
        "key_file": str(pki / "node.key"), "ca_file": str(pki / "ca.pem")}})
    node = start_node(settings, lambda s: FakeAnalyzer())
    wait_for_port(settings.dicom.tls.port)
    yield node
    node.stop()


def _storescu_tls(node, pki: Path, f: Path, client: str | None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    auth = ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.pem")] if client else [
        "+tla"]
    cmd = [require_tool("storescu"), *auth, "+cf", str(pki / "ca.pem"), "-aec", "CXR_AI",
           "-aet", "PACS", "127.0.0.1", str(node.settings.dicom.tls.port), str(f)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_trusted_client_certificate_accepted(tls_node, pki: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = make_image()
    res = _storescu_tls(tls_node, pki, write(ds, tmp_path), "pacs")
    assert res.returncode == 0, res.stderr
    assert [r.sop_instance_uid for r in query(tls_node.settings, select(db.instances))] == [
        ds.SOPInstanceUID]


@pytest.mark.parametrize("client", ["intruder", None])
def test_untrusted_or_missing_client_certificate_refused(tls_node, pki: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         client: str | None) -> None:
    res = _storescu_tls(tls_node, pki, write(make_image(), tmp_path), client)
    assert res.returncode != 0
    assert query(tls_node.settings, select(db.instances)) == []


def test_tls_older_than_1_2_refused(tls_node, pki: Path) -> None:  # type: ignore[no-untyped-def]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "pacs.pem"), str(pki / "pacs.key"))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", tls_node.settings.dicom.tls.port), 10) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw) as tls:
                tls.recv(1)
    server_ctx = tls_context(tls_node.settings.dicom.tls)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED


def test_tls_settings_name_missing_files(tmp_path: Path) -> None:
    from dicom_node.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="dicom.tls.cert_file"):
        load_settings(None, overrides={"dicom.tls": {"enabled": True}}, environ={})


def test_silent_tls_client_does_not_block_the_next_one(tls_node, pki: Path,  # type: ignore[no-untyped-def]
                                                       tmp_path: Path) -> None:
    """The handshake runs in the connection's thread: a client that connects and says
    nothing cannot hold the accept loop (it did, for every TLS peer, before)."""
    port = tls_node.settings.dicom.tls.port
    silent = [socket.create_connection(("127.0.0.1", port), 10) for _ in range(3)]
    try:
        ds = make_image()
        res = _storescu_tls(tls_node, pki, write(ds, tmp_path), "pacs")
        assert res.returncode == 0, res.stderr
    finally:
        for s in silent:
            s.close()
    res = _storescu_tls(tls_node, pki, write(make_image(), tmp_path / "x"), "intruder")
    assert res.returncode != 0
    rows = [r for r in query(tls_node.settings, select(db.audit_events))
            if r.kind == "association_rejected"]
    assert any("TLS handshake failed" in r.detail for r in rows)
