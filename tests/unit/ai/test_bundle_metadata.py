"""Bundle metadata is read without torch: the web shows it and must not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ai.bundle.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[3]


def test_importing_and_reading_metadata_does_not_import_torch(tiny_bundle: Path) -> None:
    code = ("import sys; from ai.bundle.metadata import read_metadata; "
            f"meta = read_metadata({str(tiny_bundle)!r}); "
            "assert meta.identity().device_uid; "
            "bad = sorted(m for m in ('torch', 'monai') if m in sys.modules); "
            "print(bad); raise SystemExit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_metadata(tiny_bundle).name == "tiny-test-classifier"
