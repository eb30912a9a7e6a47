"""Several worker processes start on one data dir with no model configured: exactly one
builds the demo bundles (a real quick build), the others wait for it and load its bundles."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from dicom_node import analysis
from dicom_node.config import load_settings


def test_one_build_for_workers_starting_together(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(None, overrides={"storage.data_dir": str(tmp_path),
                                              "models.demo_build": "quick"}, environ={})
    builds: list[list[str]] = []
    building = threading.Event()
    real_run = subprocess.run

    def counted(cmd: list[str], **kwargs: Any) -> Any:
        builds.append(cmd)
        building.set()
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(analysis.subprocess, "run", counted)
    found: list[list[Path]] = []
    first = threading.Thread(target=lambda: found.append(analysis.ensure_demo_bundle(settings)))
    first.start()
    assert building.wait(60), "the first worker never started its build"
    second = threading.Thread(target=lambda: found.append(analysis.ensure_demo_bundle(settings)))
    second.start()  # the build is running: this one must wait for it, not start another
    first.join(300)
    second.join(300)
    assert len(builds) == 1, builds
    assert len(found) == 2 and found[0] == found[1] and len(found[0]) == 2
