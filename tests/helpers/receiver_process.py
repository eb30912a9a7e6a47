"""A real node process with the model side faked: ``python receiver_process.py CONFIG``.

For tests that measure the receiving process from outside (RSS under a deflate bomb, an
oversize PDU, trickling peers): the listener, spool, database, assembler and workers are
the real ones; only the analyzer is :class:`helpers.fakes.FakeAnalyzer`, so no model is
loaded and the memory measured is the receiver's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def spawn(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(config)],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    from dicom_node.cli import configure_logging
    from dicom_node.config import load_settings
    from dicom_node.service import Node, run_forever
    from helpers.fakes import FakeAnalyzer

    settings = load_settings(Path(argv[0]), environ={})
    configure_logging(settings.logging.level)
    run_forever(Node(settings, lambda s: FakeAnalyzer()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
