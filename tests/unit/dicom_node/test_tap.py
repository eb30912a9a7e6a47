"""The tap of a received file: the same head, size and sha256 whether the hash ran in the
caller's thread (small data sets) or in a hashing thread of its own (large ones), and that
thread never outlives the tap's use."""

from __future__ import annotations

import gc
import hashlib
import random
import threading
import time

import pytest

from dicom_node.tap import BACKGROUND_HASH_BYTES, TAP_BYTES, Tap


def _hash_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "tap-hash")


def _wait_for(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _chunks(total: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, left = [], total
    while left:
        n = min(left, rng.choice([1, 7, 4096, 65_536, 262_138, 1 << 20]))
        out.append(rng.randbytes(n))
        left -= n
    return out


@pytest.mark.parametrize("total", [0, 100, TAP_BYTES + 1, BACKGROUND_HASH_BYTES,
                                   BACKGROUND_HASH_BYTES + 1, 9 * BACKGROUND_HASH_BYTES + 5])
def test_head_size_and_digest_are_those_of_the_bytes_fed(total: int) -> None:
    chunks = _chunks(total, seed=total)
    data = b"".join(chunks)
    before = _hash_threads()
    tap = Tap()
    for chunk in chunks:
        tap.feed(chunk)
    # a hashing thread only for a data set past the threshold, alive until the digest is read
    assert _hash_threads() - before == (1 if total > BACKGROUND_HASH_BYTES else 0)
    assert tap.size == total and bytes(tap.head) == data[:TAP_BYTES]
    assert tap.complete == (total <= TAP_BYTES)
    assert tap.sha256 == hashlib.sha256(data).hexdigest()
    assert _hash_threads() == before  # reading the digest ended it
    assert tap.sha256 == hashlib.sha256(data).hexdigest()  # and it stays readable


def test_a_buffer_reused_by_the_caller_does_not_change_the_digest() -> None:
    # pynetdicom hands over bytes; another writer may hand a buffer it then overwrites
    buf = bytearray(256 * 1024)
    tap, expected = Tap(), hashlib.sha256()
    for i in range(64):  # 16 MB: past the threshold
        chunk = bytes([i]) * len(buf)
        buf[:] = chunk
        tap.feed(memoryview(buf) if i % 2 else buf)
        buf[:] = b"\xff" * len(buf)  # at once: the thread has hardly ever hashed it yet
        expected.update(chunk)
    assert tap.sha256 == expected.hexdigest()


def test_the_hashing_thread_ends_when_closed_or_dropped_unread() -> None:
    before = _hash_threads()
    closed = Tap()
    closed.feed(bytes(BACKGROUND_HASH_BYTES + 1))
    assert _hash_threads() == before + 1
    closed.close()  # a data set abandoned mid-transfer
    closed.close()
    assert _hash_threads() == before
    assert closed.sha256 == hashlib.sha256(bytes(BACKGROUND_HASH_BYTES + 1)).hexdigest()

    dropped = Tap()
    dropped.feed(bytes(BACKGROUND_HASH_BYTES + 1))
    assert _hash_threads() == before + 1
    del dropped
    gc.collect()
    assert _wait_for(lambda: _hash_threads() == before), "a dropped tap's thread still runs"


def test_feeding_while_the_digest_is_read_elsewhere_is_not_lost() -> None:
    """close() from an abort path and sha256 from the handler at once: one join, no error."""
    tap = Tap()
    tap.feed(bytes(3 * BACKGROUND_HASH_BYTES))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(tap.sha256)) for _ in range(3)]
    threads.append(threading.Thread(target=tap.close))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [hashlib.sha256(bytes(3 * BACKGROUND_HASH_BYTES)).hexdigest()] * 3
