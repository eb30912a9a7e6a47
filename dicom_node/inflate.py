"""Deflated Explicit VR Little Endian data sets, inflated with a hard limit.

pydicom inflates a deflated data set whole, in memory, before parsing it: a 300 KiB
instance can become 300 MiB (zlib reaches about 1000:1 on zeros). The node never does
that while receiving. It streams the deflated bytes through ``zlib.decompressobj`` with a
bounded output per step, counts the inflated size, keeps only a short prefix (where the
header lives) and discards the rest, so memory stays at ``keep`` plus one step whatever
the stream claims. Above ``limit`` the instance is refused (see ``ingest.StoreStatus``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

from dicom_node.errors import InvalidInstanceError

READ_CHUNK = 64 * 1024  # deflated bytes read per step
STEP = 1024 * 1024  # inflated bytes produced per step at most


class InflateLimitError(InvalidInstanceError):
    """The data set inflates beyond the configured limit (a deflate bomb, or just too big)."""


@dataclass(frozen=True)
class Inflated:
    prefix: bytes  # the first ``keep`` inflated bytes (all of them when ``complete``)
    size: int  # the inflated size of the whole data set
    complete: bool  # True when ``prefix`` is the whole inflated data set


def inflate_bounded(fp: BinaryIO, *, limit: int, keep: int) -> Inflated:
    """Inflate raw deflate (PS3.5 A.5: RFC 1951, no zlib header) from ``fp`` to its end.

    Raises InflateLimitError as soon as more than ``limit`` bytes came out, and
    InvalidInstanceError when the stream is corrupt or truncated.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    prefix = bytearray()
    size = 0
    pending = b""
    while True:
        if not pending:
            if inflater.eof:
                break
            pending = fp.read(READ_CHUNK)
            if not pending:
                break
        try:
            out = inflater.decompress(pending, STEP)
        except zlib.error as exc:
            raise InvalidInstanceError("deflated data set is corrupt") from exc
        pending = inflater.unconsumed_tail
        size += len(out)
        if size > limit:
            raise InflateLimitError(f"data set inflates beyond {limit} B")
        if len(prefix) < keep:
            prefix += out[:keep - len(prefix)]
    if not inflater.eof:
        raise InvalidInstanceError("deflated data set is truncated")
    return Inflated(bytes(prefix), size, complete=size <= keep)
