"""What a received file's writes carried: its first bytes, its size and its sha256.

A :class:`Tap` is fed every byte written to a received data set's file
(:mod:`dicom_node.transport`, :meth:`dicom_node.spool.Spool.write_tmp`), so ingest parses
the header from memory and never reads the file back to hash it.

Hashing a large data set in the thread that receives it costs that thread as much as
reading the socket (sha256 of an 18 MB DX image: about 15 ms of the node's 60 ms per
instance, measured). Past :data:`BACKGROUND_HASH_BYTES` the tap hands its chunks to a
hashing thread of its own (``hashlib`` releases the GIL on large updates, so the hash runs
on another core while the socket is read); :attr:`Tap.sha256` waits for it. Small data sets,
the usual C-STORE, stay in the caller's thread: no thread is started for them.

The hashing thread ends when the digest is read, when :meth:`Tap.close` is called (a data set
abandoned mid-transfer) or when the tap is dropped; the chunks in flight are bounded
(:data:`MAX_CHUNKS_IN_FLIGHT`), so a slow hash slows the receiver instead of filling memory.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import weakref

# the preamble, file meta and start of the data set: the header the node files it under
TAP_BYTES = 64 * 1024
# a data set larger than this is hashed in a thread of its own (see the module doc)
BACKGROUND_HASH_BYTES = 1024 * 1024
# chunks queued for the hashing thread at most (PDV fragments: 256 kB at the default PDU)
MAX_CHUNKS_IN_FLIGHT = 32

_END = None


class Tap:
    """What went through a file's writes: its first ``keep`` bytes, its size and sha256."""

    def __init__(self, keep: int = TAP_BYTES,
                 background_after: int = BACKGROUND_HASH_BYTES) -> None:
        self.keep = keep
        self.head = bytearray()
        self.size = 0
        self._background_after = background_after
        self._digest = hashlib.sha256()
        # set together while a hashing thread runs (see _start_hasher / _finish)
        self._chunks: queue.Queue[bytes | None] | None = None
        self._hasher: threading.Thread | None = None
        self._finishing = threading.Lock()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if len(self.head) < self.keep:
            self.head += data[:self.keep - len(self.head)]
        self.size += len(data)
        if self._chunks is None and self.size > self._background_after:
            self._start_hasher()
        if self._chunks is not None:
            # the caller may reuse a mutable buffer: the thread gets bytes of its own
            # (``bytes(b)`` of a bytes object is that object, no copy)
            self._chunks.put(bytes(data))
        else:
            self._digest.update(data)

    def _start_hasher(self) -> None:
        chunks: queue.Queue[bytes | None] = queue.Queue(MAX_CHUNKS_IN_FLIGHT)
        digest = self._digest

        def run() -> None:  # holds the queue and the digest, not the tap
            while (chunk := chunks.get()) is not _END:
                digest.update(chunk)

        self._chunks = chunks
        self._hasher = threading.Thread(target=run, name="tap-hash", daemon=True)
        self._hasher.start()
        weakref.finalize(self, chunks.put, _END)  # a tap dropped unread ends its thread

    @property
    def complete(self) -> bool:
        """The head holds the whole file."""
        return self.size == len(self.head)

    @property
    def sha256(self) -> str:
        """The digest of everything fed; waits for the hashing thread (no more feeds)."""
        self._finish()
        return self._digest.hexdigest()

    def close(self) -> None:
        """End the hashing thread (idempotent); the digest stays readable."""
        self._finish()

    def _finish(self) -> None:
        with self._finishing:
            if self._hasher is None or self._chunks is None:
                return
            self._chunks.put(_END)
            self._hasher.join()
            self._hasher = self._chunks = None
