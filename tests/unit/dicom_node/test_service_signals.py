"""``dicom-node serve`` stops on SIGTERM / SIGINT and says so once, however many arrive."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from dicom_node.service import run_forever


class _Node:
    """What run_forever drives; start() is where the signals arrive (twice)."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.stopped = 0

    def start(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. a supervisor that repeats itself
        os.kill(os.getpid(), signal.SIGINT)  # and an impatient Ctrl-C

    def stop(self) -> None:
        self.stopped += 1


def test_repeated_signals_stop_once_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    caplog.set_level(logging.INFO, logger="dicom_node.service")
    node = _Node()
    try:
        run_forever(node)  # type: ignore[arg-type]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert node.stopped == 1
    assert caplog.messages == ["SIGTERM: stopping", "stopped"]
