"""The OpenAPI document is valid, served by the app, and describes exactly its routes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from openapi_spec_validator import validate
from webdata import WebEnv

from dicom_node.web.api_meta import OPENAPI_PATH

pytest_plugins = ["webfixtures"]

METHODS = {"get", "post", "put", "patch", "delete"}


def spec() -> dict:
    return yaml.safe_load(Path(OPENAPI_PATH).read_text(encoding="utf-8"))


def flask_routes(env: WebEnv) -> set[tuple[str, str]]:
    out = set()
    for rule in env.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_spec_is_valid_openapi() -> None:
    validate(spec())


def test_spec_routes_equal_flask_routes(web_env: WebEnv) -> None:
    documented = {(path, method) for path, item in spec()["paths"].items()
                  for method in item if method in METHODS}
    assert documented == flask_routes(web_env)


def test_auth_is_documented_on_every_protected_operation() -> None:
    doc = spec()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            security = op.get("security", doc["security"])
            if security == []:
                assert path in ("/healthz", "/readyz", "/dashboard/login"), path
                continue
            codes = set(op["responses"])
            assert "403" in codes, (path, method)
            assert "401" in codes or "302" in codes, (path, method)


def test_served_spec_is_the_file(web_env: WebEnv) -> None:
    resp = web_env.get("/api/v1/openapi.yaml")
    assert resp.status_code == 200 and resp.content_type.startswith("application/yaml")
    assert yaml.safe_load(resp.text) == spec()
