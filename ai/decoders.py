"""Which decoder turns each transfer syntax into pixels, and JPEG 2000 at a reduced resolution.

pydicom 3 tries its installed plugins in a fixed order, which is not the fastest order for
every syntax: JPEG-LS goes to pylibjpeg (377 ms at 2048 x 2048) before pyjpegls (95 ms).
:data:`PREFERRED_DECODERS` names the plugins measured fastest per syntax, the first
installed one used (``bench/decode.py`` prints the same rows, labelled by the plugin the node
really uses; JPEG Lossless gets libjpeg-turbo 3 through :mod:`ai.jpeg_lossless`); without
any of them pydicom makes its own choice.

JPEG 2000 stores the image as a wavelet pyramid: decoding with OpenJPEG's ``reduce = r``
(through Pillow's JPEG 2000 plugin, the one installed binding that exposes it) skips the
``r`` finest levels and returns about ``1 / 2**r`` of the rows and columns, 4-15 times
faster. Models that read 224-256 px gain nothing from the full 3000 x 2500 decode, so
:func:`j2k_reduce_level` chooses the deepest level still comfortably larger than what the
models and the overlay need. The reduced image is the codestream's low-pass band, in the
same value range as the full image (sharp edges may overshoot slightly, clipped to the
declared precision).
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder

from ai import jpeg_lossless
from ai.types import PixelDataError

logger = logging.getLogger(__name__)
jpeg_lossless.register()

J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
# Syntaxes decoded at a reduced level: JPEG 2000 part 1, the ones verified here (no HTJ2K
# encoder is installed to test .201-.203 with; part 2 .92/.93 may be multi-component).
REDUCIBLE_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})

PREFERRED_DECODERS: dict[str, tuple[str, ...]] = {
    # bench/decode.py, 2048 x 2048 12-bit phantoms, 2-core machine; the first installed wins:
    "1.2.840.10008.1.2.4.50": ("pillow",),  # JPEG Baseline: libjpeg-turbo 41 ms vs 230 ms
    # JPEG Lossless: libjpeg-turbo 3 (ai.jpeg_lossless) 65 ms vs pylibjpeg-libjpeg 431 ms at
    # 3000 x 2500, the same samples
    "1.2.840.10008.1.2.4.57": (jpeg_lossless.LABEL, "pylibjpeg"),
    "1.2.840.10008.1.2.4.70": (jpeg_lossless.LABEL, "pylibjpeg"),
    "1.2.840.10008.1.2.4.80": ("pyjpegls",),  # JPEG-LS: 95 ms vs pylibjpeg 377 ms
    "1.2.840.10008.1.2.4.81": ("pyjpegls",),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg",),  # JPEG 2000 full: openjpeg, 515 ms = pillow's
    "1.2.840.10008.1.2.4.91": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),
    "1.2.840.10008.1.2.5": ("pylibjpeg",),  # RLE: pylibjpeg-rle 12 ms vs pydicom's 142 ms
}
REDUCED_J2K_DECODER = "pillow"
"""The plugin label of the reduced JPEG 2000 decode (Pillow's OpenJPEG with ``reduce``)."""

MAX_REDUCE_LEVEL = 5


@cache
def decoder_for(tsyntax: str) -> str:
    """The plugin the node names for ``tsyntax``: the preferred one when installed,
    else "" (pydicom picks among what is installed)."""
    wanted = PREFERRED_DECODERS.get(tsyntax, ())
    if not wanted:
        return ""
    try:
        available = get_decoder(tsyntax).available_plugins
    except (NotImplementedError, ValueError):
        return ""
    return next((plugin for plugin in wanted if plugin in available), "")


def decoder_label(tsyntax: str) -> str:
    """The decoder that really runs for a full decode, for logs and benchmark rows."""
    named = decoder_for(tsyntax)
    if named:
        return named
    try:
        plugins = get_decoder(tsyntax).available_plugins
    except (NotImplementedError, ValueError):
        return "none"
    return plugins[0] if plugins else "none"


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a JPEG 2000 codestream says about reducing it."""

    rows: int
    columns: int
    components: int
    precision: int  # bits per sample of the first component
    signed: bool
    levels: int  # wavelet decomposition levels (COD SPcod), the deepest possible reduce
    offset: tuple[int, int] = (0, 0)  # image origin on the reference grid (XOsiz, YOsiz)


def j2k_header(codestream: bytes) -> J2KHeader | None:
    """Parse SIZ (ISO 15444-1 A.5.1) and COD (A.6.1) from the main header; None if absent."""
    head = codestream[:65536]
    siz = head.find(b"\xff\x4f\xff\x51")
    if siz < 0 or len(head) < siz + 43:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[siz + 8 : siz + 24])
    (csiz,) = struct.unpack(">H", head[siz + 40 : siz + 42])
    ssiz = head[siz + 42]
    levels = _cod_levels(head, siz + 2)
    if levels is None:
        return None
    return J2KHeader(
        rows=max(ysiz - yosiz, 0), columns=max(xsiz - xosiz, 0), components=csiz,
        precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80), levels=levels,
        offset=(xosiz, yosiz),
    )  # fmt: skip


def _cod_levels(head: bytes, pos: int) -> int | None:
    """Decomposition levels from the COD segment, walking the main header's segments."""
    while pos + 4 <= len(head) and head[pos] == 0xFF:
        marker = head[pos + 1]
        if marker in (0x90, 0x93, 0xD9):  # SOT, SOD, EOC: the main header is over
            return None
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if marker == 0x52:
            return head[pos + 9] if pos + 10 <= len(head) else None
        pos += 2 + length
    return None


def first_frame_bytes(ds: Dataset) -> bytes:
    """The encapsulated first frame (all its fragments), as the decoders get it."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=frames))
    except (StopIteration, ValueError, struct.error) as exc:
        raise PixelDataError(f"Encapsulated Pixel Data has no readable frame ({exc})") from exc


def transfer_syntax(ds: Dataset) -> str:
    """The dataset's transfer syntax UID, "" without file meta."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def j2k_reduce_level(ds: Dataset, min_short_side: int) -> int:
    """The deepest reduce level whose image keeps ``min_short_side`` px on its short side.

    0 (a full decode) unless the syntax is a reducible JPEG 2000, the image is one grey
    component of at most 16 bits whose precision and sign agree with the header (so the
    reduced path returns what the full one would), and the codestream has the levels.
    """
    short, levels = _j2k_levels(ds)
    return deepest_level(short, min_short_side, levels)


def deepest_level(short_side: int, min_short_side: int,
                  levels: Iterable[int] = range(1, MAX_REDUCE_LEVEL + 1)) -> int:
    """The deepest of ``levels`` whose ``ceil(short_side / 2**level)`` keeps
    ``min_short_side`` (and at least 1) pixels; 0 when none does."""
    need = max(min_short_side, 1)
    return max((level for level in levels if -(-short_side // 2**level) >= need), default=0)


def j2k_decodes_at(ds: Dataset, level: int) -> bool:
    """Whether :func:`decode_j2k_reduced` is trusted at ``level`` for ``ds`` (see
    :func:`j2k_reduce_level`); False for any other syntax."""
    return level in _j2k_levels(ds)[1]


def _j2k_levels(ds: Dataset) -> tuple[int, list[int]]:
    """The codestream's short side and the reduce levels trusted for it (none: [])."""
    if (
        transfer_syntax(ds) not in REDUCIBLE_SYNTAXES
        or "PixelData" not in ds
        or int(ds.get("SamplesPerPixel", 1) or 1) != 1
    ):
        return 0, []
    try:
        header = j2k_header(first_frame_bytes(ds))
    except PixelDataError:
        return 0, []
    if (
        header is None
        or header.components != 1
        or header.offset != (0, 0)  # reduced sizes then depend on the origin: not worth it
        or header.precision > 16
        or header.precision != int(ds.get("BitsStored", 0) or 0)
        or header.signed != bool(int(ds.get("PixelRepresentation", 0) or 0))
    ):
        return 0, []
    return min(header.rows, header.columns), [
        level
        for level in range(1, min(header.levels, MAX_REDUCE_LEVEL) + 1)
        if _pillow_sizes_agree(header.rows, level) and _pillow_sizes_agree(header.columns, level)
    ]


def _pillow_sizes_agree(length: int, level: int) -> bool:
    """Whether Pillow expects the size OpenJPEG returns at ``level``.

    OpenJPEG returns ``ceil(length / 2**level)`` samples; Pillow 13's plugin expects
    ``int((length + 2**(level - 1)) / 2**level)`` and fails with "broken data stream" when
    the two differ (1841 columns at level 2: 461 vs 460). Such levels are not chosen.
    """
    power = 1 << level
    return -(-length // power) == (length + (power >> 1)) // power


def decode_j2k_reduced(ds: Dataset, level: int) -> np.ndarray:
    """The first frame at ``1 / 2**level`` resolution, as stored values (int16/uint16/8-bit).

    Pillow widens N-bit samples to its 8/16-bit container (shifted left, signed ones offset
    by ``2**(N-1)``); this undoes both so the values equal the full decode's in range.

    Raises:
        PixelDataError: the codestream cannot be decoded at that level.
    """
    codestream = first_frame_bytes(ds)
    header = j2k_header(codestream)
    if header is None:
        raise PixelDataError("JPEG 2000 main header (SIZ/COD) not found")
    try:
        with Image.open(io.BytesIO(codestream), formats=("JPEG2000",)) as image:
            image.reduce = level  # type: ignore[method-assign,assignment]
            image.load()
            width, height = image.size
            raw = image.tobytes()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PixelDataError(f"Cannot decode JPEG 2000 at reduce level {level}: {exc}") from exc
    container = 8 if header.precision <= 8 else 16
    stored = np.frombuffer(raw, dtype=np.uint8 if container == 8 else "<u2")
    values = stored.reshape(height, width).astype(np.int32) >> (container - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    kind = "i" if header.signed else "u"
    return values.astype(f"{kind}{container // 8}")
