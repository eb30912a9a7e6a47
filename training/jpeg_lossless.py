"""A small, vectorised JPEG Lossless encoder (ITU-T T.81 process 14, selection value 1).

pydicom has decoders but no encoder for *JPEG Lossless, Non-Hierarchical,
First-Order Prediction* (transfer syntax 1.2.840.10008.1.2.4.70), the most
common lossless syntax in real PACS traffic, so the phantom generator brings
its own.  One grey-level component, predictor 1 (the pixel to the left; the
first column uses the pixel above, the first pixel ``2**(P-1)``), no point
transform, no restart intervals, and a Huffman table optimised for the image
(Annex K.2) over the 17 difference categories 0..16.

Everything per pixel is numpy: categories via ``frexp``, codes joined with
their extra bits into <= 31-bit words, packed into 32-bit big-endian words
with ``bincount`` (the fields are disjoint, so a sum is an OR and float64
holds it exactly), then 0xFF bytes are stuffed with 0x00.
"""

from __future__ import annotations

import logging

import numpy as np

from training.errors import TrainingError

logger = logging.getLogger(__name__)

SOI, EOI, SOF3, DHT, SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xc3", b"\xff\xc4", b"\xff\xda"
_CATEGORIES = 17  # SSSS 0..16


class JPEGLosslessError(TrainingError, ValueError):
    """Raised when an array cannot be encoded (shape, dtype, range, precision)."""


def encode(arr: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D unsigned integer image as a JPEG Lossless SV1 codestream.

    Args:
        arr: (rows, columns) array of non-negative integers < ``2**precision``.
        precision: sample precision P in bits, 2..16 (use DICOM Bits Stored).

    Returns:
        The complete codestream, SOI to EOI (possibly odd length; DICOM
        encapsulation pads it).
    """
    _check(arr, precision)
    diff = _differences(arr.astype(np.int32, copy=False), precision)
    ssss = np.frexp(np.abs(diff))[1].astype(np.int64)
    counts = np.bincount(ssss.ravel(), minlength=_CATEGORIES)
    bits, huffval = _huffman_table(counts)
    code_of, size_of = _canonical_codes(bits, huffval)
    entropy = _entropy_coded(diff.ravel(), ssss.ravel(), code_of, size_of)
    rows, cols = arr.shape
    header = _segment(DHT, bytes([0x00]) + bytes(bits[1:17]) + bytes(huffval))
    frame = _segment(
        SOF3,
        bytes([precision])
        + rows.to_bytes(2, "big")
        + cols.to_bytes(2, "big")
        + b"\x01\x01\x11\x00",
    )
    scan = _segment(SOS, bytes([1, 1, 0x00, 1, 0, 0]))
    return SOI + header + frame + scan + entropy + EOI


def _check(arr: np.ndarray, precision: int) -> None:
    if not 2 <= precision <= 16:
        raise JPEGLosslessError(f"Precision {precision} is not supported (2..16)")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1 or max(arr.shape) > 65535:
        raise JPEGLosslessError(f"Array shape {arr.shape} is not a single 2-D frame of 1..65535")
    if arr.dtype.kind not in "ui":
        raise JPEGLosslessError(f'Array dtype "{arr.dtype}" is not an integer type')
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= 1 << precision:
        raise JPEGLosslessError(f"Pixel values {lo}..{hi} do not fit {precision}-bit precision")


def _differences(x: np.ndarray, precision: int) -> np.ndarray:
    """Prediction residuals for predictor 1, reduced modulo 2**16 (H.1.2.1)."""
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[0, 0] = 1 << (precision - 1)
    diff = x - pred
    # residuals live in -32767..32768; only P = 16 can actually wrap
    return np.mod(diff + 32767, 65536) - 32767


def _huffman_table(counts: np.ndarray) -> tuple[list[int], list[int]]:
    """BITS (index 1..16) and HUFFVAL for the frequencies, T.81 Annex K.2."""
    freq = [int(c) for c in counts] + [1]  # the last symbol reserves the all-ones code
    n = len(freq)
    codesize, others = [0] * n, [-1] * n
    while True:
        live = [i for i in range(n) if freq[i] > 0]
        if len(live) < 2:
            break
        # least frequent, ties to the larger symbol; then the next least
        v1 = min(live, key=lambda i: (freq[i], -i))
        v2 = min((i for i in live if i != v1), key=lambda i: (freq[i], -i))
        freq[v1] += freq[v2]
        freq[v2] = 0
        for v in (v1, v2):
            codesize[v] += 1
            while others[v] != -1:
                v = others[v]
                codesize[v] += 1
        tail = v1
        while others[tail] != -1:
            tail = others[tail]
        others[tail] = v2
    bits = [0] * 33
    for size in codesize:
        if size:
            bits[size] += 1
    _limit_lengths(bits)
    order = sorted((size, sym) for sym, size in enumerate(codesize) if size and sym < n - 1)
    return bits[:17], [sym for _, sym in order]


def _limit_lengths(bits: list[int]) -> None:
    """Adjust code-length counts to at most 16 bits and drop the reserved code (K.3)."""
    for i in range(32, 16, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1


def _canonical_codes(bits: list[int], huffval: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-category code and code length from BITS/HUFFVAL (T.81 Annex C)."""
    code_of = np.zeros(_CATEGORIES, np.uint64)
    size_of = np.zeros(_CATEGORIES, np.int64)
    code, k = 0, 0
    for length in range(1, 17):
        for _ in range(bits[length]):
            code_of[huffval[k]] = code
            size_of[huffval[k]] = length
            code += 1
            k += 1
        code <<= 1
    return code_of, size_of


def _entropy_coded(
    diff: np.ndarray, ssss: np.ndarray, code_of: np.ndarray, size_of: np.ndarray
) -> bytes:
    """Huffman codes plus extra bits, packed MSB first, padded with 1s, 0xFF-stuffed."""
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(diff < 0, diff + (np.int64(1) << extra_len) - 1, diff).astype(np.uint64)
    extra &= (np.uint64(1) << extra_len.astype(np.uint64)) - np.uint64(1)
    length = size_of[ssss] + extra_len
    word = (code_of[ssss] << extra_len.astype(np.uint64)) | extra
    end = np.cumsum(length)
    total = int(end[-1])
    start = end - length
    del end
    index = start >> 5
    shifted = word << (64 - length - (start & 31)).astype(np.uint64)
    n_words = (total + 31) // 32 + 1
    words = np.bincount(
        index, weights=(shifted >> np.uint64(32)).astype(np.float64), minlength=n_words
    )
    words += np.bincount(
        index + 1, weights=(shifted & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_words
    )
    data = words.astype(np.uint32).astype(">u4").view(np.uint8)[: (total + 7) // 8].copy()
    if total % 8:
        data[-1] |= (1 << (8 - total % 8)) - 1
    stuffed = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0)
    return stuffed.tobytes()


def _segment(marker: bytes, payload: bytes) -> bytes:
    return marker + (len(payload) + 2).to_bytes(2, "big") + payload
