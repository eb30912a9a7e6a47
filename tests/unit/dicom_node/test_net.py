"""A release that cannot hang the sender (pynetdicom's release() can wait for ever)."""

from __future__ import annotations

import threading
import time

from dicom_node.net import release_or_abort


class StuckAssociation:
    """Like pynetdicom's Association when its reactor never pauses: release() waits until
    the association is killed (abort), as pynetdicom's spin on ``_is_paused`` does."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self.killed = threading.Event()
        self.released = False

    def release(self) -> None:
        if self.stuck:
            self.killed.wait()
        self.released = not self.killed.is_set()

    def abort(self) -> None:
        self.killed.set()


def test_a_release_that_hangs_is_aborted_within_the_timeout() -> None:
    assoc = StuckAssociation(stuck=True)
    started = time.monotonic()
    assert release_or_abort(assoc, 0.3, "PACS@127.0.0.1:104") is False
    assert assoc.killed.is_set() and not assoc.released
    assert time.monotonic() - started < 2.0


def test_a_normal_release_is_not_aborted() -> None:
    assoc = StuckAssociation(stuck=False)
    assert release_or_abort(assoc, 5.0, "PACS@127.0.0.1:104") is True
    assert assoc.released and not assoc.killed.is_set()
