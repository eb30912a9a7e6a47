"""Run a node in-process (threads) or as a real subprocess, for socket tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import ROOT, free_port, wait_for_port
from sqlalchemy import select

from dicom_node.config import Settings, load_settings
from dicom_node.service import Node
from dicom_node.store import db


def node_settings(data_dir: Path, *, destinations: list[str | dict[str, Any]] | None = None,
                  quiet: float = 0.5, **overrides: Any) -> Settings:
    """Settings for a test node; a destination is ``AE@HOST:PORT`` or a full mapping."""
    values: dict[str, Any] = {
        "storage.data_dir": str(data_dir),
        "dicom.port": free_port(),
        "studies.quiet_period_s": quiet,
        "studies.poll_interval_s": 0.1,
        "workers.poll_interval_s": 0.1,
        "workers.backoff_initial_s": 0.2,
        "workers.backoff_max_s": 1.0,
        "sender.poll_interval_s": 0.1,
        "sender.backoff_initial_s": 0.2,
        "sender.backoff_max_s": 1.0,
        "sender.timeout_s": 5,
        "storage.min_free_bytes": 0,
        "web.enabled": False,
        "destinations": [d if isinstance(d, dict) else
                         {"ae_title": d.split("@")[0], "host": d.split("@")[1].split(":")[0],
                          "port": int(d.rsplit(":", 1)[1])} for d in destinations or []],
    }
    values.update(overrides)
    return load_settings(None, overrides=values, environ={})


def start_node(settings: Settings, analyzer_factory: Callable[[Settings], Any]) -> Node:
    node = Node(settings, analyzer_factory)
    node.start()
    wait_for_port(settings.dicom.port)
    return node


def query(settings: Settings, stmt: Any) -> list[Any]:
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(stmt).all()
    finally:
        engine.dispose()


def studies(settings: Settings) -> dict[str, Any]:
    return {r.study_uid: r for r in query(settings, select(db.studies))}


def write_config(settings: Settings, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def spawn_node(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``dicom-node serve`` as a real process (for kill -9 tests)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config",
                                 str(config)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=full_env)


def spawn_fake_node(config: Path, log: Path, *, block_study: str | None = None
                    ) -> subprocess.Popen:
    """The node with the fake analyzer as a real process (``tests/helpers/fake_node.py``)."""
    cmd = [sys.executable, str(ROOT / "tests" / "helpers" / "fake_node.py"), str(config)]
    if block_study:
        cmd += ["--block-study", block_study]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
