"""What a real ``storescu`` saw acknowledged: the proof side of ACK subset of DURABLE."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import pydicom
from conftest import require_tool


def storescu_async(port: int, files: list[Path]) -> tuple[subprocess.Popen, list[str],
                                                          threading.Thread]:
    """``storescu -v`` sending ``files`` in the background; its output lines are collected
    (join the reader thread after the process ends)."""
    cmd = [require_tool("storescu"), "-v", "-aec", "CXR_AI", "-aet", "PACS", "-to", "10",
           "127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []))
    reader.start()
    return proc, lines, reader


def acked_uids(out_lines: list[str]) -> set[str]:
    """SOP Instance UIDs storescu -v saw answered with Success."""
    acked, current = set(), None
    for line in out_lines:
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.add(str(pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID))
    return acked
