"""``training demo-bundles --quick`` as the node runs it: a process with stdout a pipe (as
when the node's log takes it) and stderr a pseudo-terminal (where progress bars go). Built
once per session (``quick_demo_build`` in tests/conftest.py) for every test that only reads
the quick demo bundles."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Build:
    out: Path
    stdout: str  # a pipe, as when the node runs the build with its output in its log
    terminal: str  # stderr on a pseudo-terminal: where the progress bars go


def _read_all(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return
        if not data:
            return
        into.append(data)


def run_quick_build(out: Path, cwd: Path) -> Build:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(master, chunks), daemon=True)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "training", "demo-bundles", "--quick",
                                 "--out", str(out)], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=slave, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        reader.start()
        stdout, _ = proc.communicate(timeout=300)
        reader.join(30)
    finally:
        os.close(master)
    assert proc.returncode == 0, stdout.decode() + b"".join(chunks).decode(errors="replace")
    return Build(out, stdout.decode(), b"".join(chunks).decode("utf-8", errors="replace"))
