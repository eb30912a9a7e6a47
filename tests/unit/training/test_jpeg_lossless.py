"""The home-made JPEG Lossless SV1 encoder must be bit-exact for independent decoders."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, generate_uid

from training import jpeg_lossless
from training.jpeg_lossless import JPEGLosslessError, encode
from training.phantoms import render_phantom

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _write(arr: np.ndarray, precision: int, path: Path) -> Path:
    """Wrap one encoded frame in a minimal Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.SOPClassUID, ds.SOPInstanceUID = SC_STORAGE, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if precision <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = precision, precision - 1, 0
    ds.PixelData = encapsulate([encode(arr, precision)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _images(precision: int) -> list[np.ndarray]:
    rng = np.random.default_rng(precision)
    top = (1 << precision) - 1
    dtype = np.uint8 if precision <= 8 else np.uint16
    phantom = np.rint(render_phantom(precision, 97, 131).image * top)
    extremes = np.tile(np.array([[0, top], [top, 0]]), (8, 9))  # largest residuals (SSSS = P)
    return [
        a.astype(dtype)
        for a in (
            rng.integers(0, top + 1, (41, 57)),
            phantom,
            extremes,
            np.full((7, 5), top),
            np.zeros((1, 1)),
            rng.integers(0, top + 1, (1, 33)),
            rng.integers(0, top + 1, (29, 1)),
        )
    ]


@pytest.mark.parametrize("precision", [2, 8, 10, 12, 15, 16])
def test_pydicom_decodes_bit_exact(tmp_path: Path, precision: int) -> None:
    for i, arr in enumerate(_images(precision)):
        path = _write(arr, precision, tmp_path / f"{i}.dcm")
        decoded = pydicom.dcmread(path).pixel_array
        assert decoded.shape == arr.shape
        assert np.array_equal(decoded, arr), f"image {i} differs at precision {precision}"


@pytest.mark.parametrize("precision", [8, 12, 16])
def test_dcmtk_decodes_bit_exact(tmp_path: Path, precision: int) -> None:
    dcmdjpeg = shutil.which("dcmdjpeg")
    if dcmdjpeg is None:
        pytest.fail("DCMTK dcmdjpeg is not installed" + "; make test installs it")
    for i, arr in enumerate(_images(precision)):
        src = _write(arr, precision, tmp_path / f"{i}.dcm")
        out = tmp_path / f"{i}_raw.dcm"
        res = subprocess.run(
            [dcmdjpeg, str(src), str(out)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        assert np.array_equal(pydicom.dcmread(out).pixel_array, arr), (
            f"image {i}, precision {precision}"
        )


def test_sixteen_bit_wraparound_uses_category_16(tmp_path: Path) -> None:
    """A residual of exactly 32768 is coded as SSSS = 16 with no extra bits (H.1.2.2)."""
    arr = np.array([[0, 32768, 0, 65535, 0, 32767]] * 3, dtype=np.uint16)
    diff = jpeg_lossless._differences(arr.astype(np.int32), 16)
    assert diff.max() == 32768 and diff.min() >= -32767
    assert np.array_equal(pydicom.dcmread(_write(arr, 16, tmp_path / "w.dcm")).pixel_array, arr)


def test_huffman_table_limits_code_lengths_to_16_bits() -> None:
    counts = np.array([2**i for i in range(17)][::-1], dtype=np.int64)  # very skewed
    bits, huffval = jpeg_lossless._huffman_table(counts)
    assert len(bits) == 17 and bits[0] == 0
    assert sum(bits) == len(huffval) == 17
    kraft = sum(n * 2.0**-length for length, n in enumerate(bits) if length)
    assert kraft < 1.0  # the all-ones code stays unused


def test_codestream_structure_and_byte_stuffing() -> None:
    arr = np.random.default_rng(3).integers(0, 4096, (64, 64)).astype(np.uint16)
    data = encode(arr, 12)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    assert b"\xff\xc3" in data and b"\xff\xc4" in data
    scan = data[data.index(b"\xff\xda") + 10 : -2]
    marks = [i for i in range(len(scan) - 1) if scan[i] == 0xFF]
    assert all(scan[i + 1] == 0x00 for i in marks), "an 0xFF in the scan is not stuffed"


def test_encoding_is_deterministic_and_compresses() -> None:
    arr = np.rint(render_phantom(1, 256, 256).image * 4095).astype(np.uint16)
    assert encode(arr, 12) == encode(arr, 12)
    assert len(encode(arr, 12)) < arr.nbytes * 0.8


def test_large_image_encodes_in_about_a_second() -> None:
    arr = np.rint(render_phantom(2, 2048, 2048).image * 4095).astype(np.uint16)
    encode(arr[:256, :256], 12)  # warm up
    start = time.perf_counter()
    data = encode(arr, 12)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"2048 x 2048 took {elapsed:.2f} s"
    assert len(data) < arr.nbytes


@pytest.mark.parametrize(
    ("arr", "precision", "match"),
    [
        (np.zeros((4, 4), np.uint16), 1, "Precision 1"),
        (np.zeros((4, 4), np.uint16), 17, "Precision 17"),
        (np.full((4, 4), 4096, np.uint16), 12, "do not fit 12-bit"),
        (np.full((4, 4), -1, np.int16), 12, "do not fit"),
        (np.zeros((2, 4, 4), np.uint16), 12, "single 2-D frame"),
        (np.zeros((4, 4), np.float32), 12, "not an integer type"),
    ],
)
def test_bad_input_is_rejected(arr: np.ndarray, precision: int, match: str) -> None:
    with pytest.raises(JPEGLosslessError, match=match):
        encode(arr, precision)
