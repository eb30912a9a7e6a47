"""The image exposes exactly the ports its configuration uses: the DICOM listener and the
web port, both set from build args whose defaults are the configuration's defaults."""

from __future__ import annotations

import re
from pathlib import Path

from dicom_node.config import load_settings

DOCKERFILE = Path(__file__).resolve().parents[3] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [(m[1].upper(), m[2].strip()) for m in
            re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)
            if not m[0].lstrip().startswith("#")]


def test_exposes_only_the_configured_ports_from_build_args() -> None:
    ins = instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG")
    defaults = load_settings(None, environ={})
    assert args == {"DICOM_PORT": str(defaults.dicom.port), "WEB_PORT": str(defaults.web.port)}
    (exposed,) = [v for k, v in ins if k == "EXPOSE"]
    assert exposed.split() == ["${DICOM_PORT}", "${WEB_PORT}"]  # no TLS port: opt-in
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "CXR_NODE__DICOM__PORT=${DICOM_PORT}" in env
    assert "CXR_NODE__WEB__PORT=${WEB_PORT}" in env
    healthcheck = " ".join(v for k, v in ins if k == "HEALTHCHECK")
    assert "CXR_NODE__WEB__PORT" in healthcheck and "8080" not in healthcheck


def test_the_environment_overrides_reach_the_settings() -> None:
    settings = load_settings(None, environ={"CXR_NODE__DICOM__PORT": "104",
                                            "CXR_NODE__WEB__PORT": "9090"})
    assert (settings.dicom.port, settings.web.port) == (104, 9090)
