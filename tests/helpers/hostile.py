"""Hostile peers for the receiving tests: a peer trickling PDUs under the network timeout,
web clients that stall mid-request, and the node's memory read from /proc."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers.rawdicom import associate, closed_or_aborted

MAX_PDU = 64 * 1024


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


def stalled_clients(port: int, n: int) -> list[socket.socket]:
    """``n`` HTTP clients that send half a request line, then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /healthz HTT")
        socks.append(s)
    return socks


class Trickler(threading.Thread):
    """A peer that sends one small PDU every ``every`` s, under the network timeout."""

    def __init__(self, port: int, calling: str, first: bytes | None,
                 next_pdu: Callable[[int], bytes], context: str, every: float = 2.5) -> None:
        super().__init__(daemon=True)
        self.port, self.calling, self.first, self.next_pdu = port, calling, first, next_pdu
        self.context, self.every = context, every
        self.connected = threading.Event()
        self.lasted: float | None = None
        self.sent = 0

    def run(self) -> None:
        sock = associate(self.port, self.calling, self.context, max_pdu=MAX_PDU)
        started = time.monotonic()
        self.connected.set()
        try:
            if self.first:
                sock.sendall(self.first)
            last = 0.0
            while time.monotonic() - started < 60:
                if closed_or_aborted(sock):
                    self.lasted = time.monotonic() - started
                    return
                if time.monotonic() - last >= self.every:
                    sock.sendall(self.next_pdu(self.sent))
                    self.sent += 1
                    last = time.monotonic()
                time.sleep(0.05)
        except OSError:
            self.lasted = time.monotonic() - started
        finally:
            sock.close()
