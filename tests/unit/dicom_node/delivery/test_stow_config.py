"""``type: stow-rs`` destinations: validated once, secrets only from the environment, never
in dumps, summaries, fingerprints or error messages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import (
    ConfigError,
    Destination,
    SenderSettings,
    StowRsDestination,
    load_settings,
)
from dicom_node.node_events import settings_fingerprint, settings_summary
from dicom_node.sender import Sender

ROOT_URL = "https://pacs.example:8443/dicom-web"
SECRET = "pw-7f3c-never-logged"


def _load(*destinations: dict[str, Any]) -> Any:
    return load_settings(None, environ={}, overrides={"destinations": list(destinations)})


def test_c_store_and_stow_rs_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_STOW_PASSWORD", SECRET)
    settings = _load({"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                     {"type": "stow-rs", "url": ROOT_URL + "/", "outputs": ["sr", "gsps"],
                      "auth": {"type": "basic", "username": "cxr",
                               "password_env": "PACS_STOW_PASSWORD"}})
    cstore, stow = settings.destinations
    assert isinstance(cstore, Destination) and cstore.type == "c-store"
    assert isinstance(stow, StowRsDestination)
    assert stow.url == ROOT_URL and stow.stow_url == ROOT_URL + "/studies"
    assert stow.name == f"stow-rs:{ROOT_URL}" and stow.outputs == ["sr", "gsps"]
    assert stow.auth.requests_auth() == ("cxr", SECRET) and stow.auth.headers() == {}
    assert stow.tls_verify is True and stow.timeout_s == 30 and not stow.storage_commitment
    for text in (repr(settings), str(settings.model_dump(mode="json")),
                 settings_summary(settings)):
        assert SECRET not in text
    assert "stow-rs:https://pacs.example:8443/dicom-web[sr,gsps]" in settings_summary(settings)
    fingerprint = settings_fingerprint(settings)
    monkeypatch.setenv("PACS_STOW_PASSWORD", "another")
    assert settings_fingerprint(_load(cstore.model_dump(), stow.model_dump())) == fingerprint


def test_bearer_token_name_and_ca_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PACS_TOKEN", "tok")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    [stow] = _load({"type": "stow-rs", "url": ROOT_URL, "name": "vna-web", "ca_file": str(ca),
                    "auth": {"type": "bearer", "token_env": "PACS_TOKEN"}}).destinations
    assert stow.name == "vna-web" and stow.tls_verify == str(ca)
    assert stow.auth.headers() == {"Authorization": "Bearer tok"}
    assert stow.auth.requests_auth() is None


@pytest.mark.parametrize(("destination", "message"), [
    ({"url": "ftp://pacs/dicom-web"}, r"url: .*must be an http:// or https:// DICOMweb root"),
    ({"url": ROOT_URL + "/studies"}, r"url: .*must be the DICOMweb root, without /studies"),
    ({"url": "https://cxr:hunter2@pacs/dicom-web"}, r"url: .*must not carry credentials"),
    ({"url": ROOT_URL, "auth": {"type": "bearer"}},
     r"auth: .*auth.token_env is required with auth.type bearer"),
    ({"url": ROOT_URL, "auth": {"type": "basic", "username": "u", "password_env": "NOT_SET_X"}},
     r"environment variable NOT_SET_X is not set or empty"),
    ({"url": ROOT_URL, "auth": {"type": "bearer", "token_env": "abc def"}},
     r"is not an environment variable name \(give the variable's name, never the secret"),
    ({"url": ROOT_URL, "auth": {"type": "none", "username": "u"}},
     r"auth.username does not apply to auth.type none"),
    ({"url": ROOT_URL, "storage_commitment": True},
     r"storage_commitment does not apply to a stow-rs destination"),
    ({"url": ROOT_URL, "verify_tls": False, "ca_file": "/etc/hostname"},
     r"ca_file needs verify_tls: true"),
    ({"url": ROOT_URL, "ca_file": "/nonexistent/ca.pem"}, r"ca_file .* is not a readable file"),
    ({"url": ROOT_URL, "timeout_s": 0}, r"destinations\.0\.timeout_s: .*greater than 0"),
    ({"url": ROOT_URL, "password": "x"}, r"destinations\.0\.password: Extra inputs"),
    ({"url": ROOT_URL + "/" + "x" * 120}, r"must be 1-128 printable characters .*: set name"),
])
def test_bad_stow_rs_settings_name_the_key(destination: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load({"type": "stow-rs", **destination})
    assert "hunter2" not in str(info.value)


def test_unknown_type_and_duplicate_names() -> None:
    with pytest.raises(ConfigError, match=r"destinations\.0: type must be c-store .* or stow-rs"):
        _load({"type": "smtp", "url": ROOT_URL})
    with pytest.raises(ConfigError, match=r"two destinations are named 'stow-rs:https://pacs"):
        _load({"type": "stow-rs", "url": ROOT_URL}, {"type": "stow-rs", "url": ROOT_URL + "/"})


def test_sender_warns_about_clear_text_credentials_and_unverified_tls(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PACS_STOW_PASSWORD", SECRET)
    basic = {"type": "basic", "username": "cxr", "password_env": "PACS_STOW_PASSWORD"}
    settings = _load({"type": "stow-rs", "url": "http://pacs.example/dicom-web", "auth": basic},
                     {"type": "stow-rs", "url": "http://127.0.0.1:8042/dicom-web",
                      "auth": basic},
                     {"type": "stow-rs", "url": ROOT_URL, "verify_tls": False})
    caplog.set_level(logging.WARNING, logger="dicom_node.sender")
    Sender(None, None, settings.destinations, SenderSettings(), "CXR_AI")  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "destination stow-rs:http://pacs.example/dicom-web: basic auth over plain http sends "
        "the credentials in clear text; use https",
        f"destination stow-rs:{ROOT_URL}: TLS certificate verification is off"]
    assert SECRET not in caplog.text
