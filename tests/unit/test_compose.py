"""The compose file describes what the tests run: each node service's command is a
``dicom-node serve --role`` invocation the CLI parser accepts, the roles together are all
five, each service's environment is a valid configuration, and the deployment pieces the
README names are there (PostgreSQL with a volume and a healthcheck, the shared data volume,
the GPU reservation of the worker). Docker does not run here; this is the check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.cli import build_parser
from dicom_node.config import load_settings
from dicom_node.roles import ALL

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _node_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _compose()["services"].items()
            if s.get("image") == "cxr-ai-node"}


def _interpolated(env: dict[str, str]) -> dict[str, str]:
    """Compose's ``${VAR:?message}`` with a value, as ``docker compose`` would after the
    operator set it."""
    return {k: re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "secret", str(v)) for k, v in env.items()}


def test_every_node_service_runs_a_role_the_cli_accepts_and_all_roles_are_covered() -> None:
    services = _node_services()
    assert set(services) == {"receiver", "worker", "sender", "web", "scheduler"}
    covered: set[str] = set()
    for name, service in services.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "serve" and (ROOT / args.config).is_file(), name
        assert args.role != ALL, f"{name} runs every role"
        covered |= args.role
    assert covered == ALL


@pytest.mark.parametrize("name", ["receiver", "worker", "sender", "web", "scheduler"])
def test_each_service_environment_is_a_valid_configuration_on_the_shared_volume(
        name: str) -> None:
    service = _node_services()[name]
    settings = load_settings(ROOT / "config" / "node.yaml",
                             environ=_interpolated(service["environment"]))
    assert settings.database_url.startswith("postgresql+psycopg://cxr:secret@postgres")
    assert "cxr-data:" + str(settings.storage.data_dir) in service["volumes"]
    if name == "receiver":
        assert f"{settings.dicom.port}:{settings.dicom.port}" in service["ports"]
        assert settings.dicom.host == "0.0.0.0"
    if name == "web":
        assert f"127.0.0.1:{settings.web.port}:{settings.web.port}" in service["ports"]
    if name == "worker":
        assert settings.models.device == "cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_postgres_has_a_volume_a_healthcheck_and_the_nodes_wait_for_it() -> None:
    compose = _compose()
    pg = compose["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert {"cxr-data", "cxr-db"} <= set(compose["volumes"])
    for name, service in _node_services().items():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
