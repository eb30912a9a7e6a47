"""JPEG Lossless decoded by libjpeg-turbo 3 (``ai.jpeg_lossless``): the node's decoder for
``.57`` / ``.70``, checked against images encoded by an independent encoder (DCMTK's
``dcmcjpeg``, IJG-based) at every bit depth, sign and predictor a modality writes: the samples
must come back exactly, and equal to pylibjpeg-libjpeg's, the decoder it replaces."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aihelpers import grey_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLossless, JPEGLosslessSV1

import ai.pixels
from ai import jpeg_lossless
from ai.decoders import decoder_for, decoder_label

pytestmark = pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="needs DCMTK")


def _encode(tmp_path: Path, ds: pydicom.Dataset, *options: str) -> pydicom.Dataset:
    """``ds`` written uncompressed, compressed by dcmcjpeg with ``options``, read back."""
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds.save_as(src, enforce_file_format=True)
    done = subprocess.run(["dcmcjpeg", *options, str(src), str(out)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    return pydicom.dcmread(out)


def _pixels(bits: int, signed: bool, shape: tuple[int, int] = (301, 257)) -> np.ndarray:
    """Edges, ramps and noise over the whole range of ``bits`` (odd sizes on purpose)."""
    rng = np.random.default_rng(bits + 100 * signed)
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    ramp = np.linspace(lo, hi, shape[1])[None, :].repeat(shape[0], 0)
    noise = rng.integers(lo, hi + 1, shape)
    pixels = np.where(rng.random(shape) < 0.3, noise, ramp).round()
    pixels[:20] = lo
    pixels[-20:] = hi
    dtype = f"{'i' if signed else 'u'}{1 if bits <= 8 else 2}"
    return pixels.astype(dtype)


def test_the_node_decodes_jpeg_lossless_with_libjpeg_turbo() -> None:
    for tsyntax in (JPEGLossless, JPEGLosslessSV1):
        assert decoder_for(tsyntax) == decoder_label(tsyntax) == jpeg_lossless.LABEL
        assert jpeg_lossless.is_available(tsyntax)
    assert not jpeg_lossless.is_available("1.2.840.10008.1.2.4.50")  # lossy: not ours
    jpeg_lossless.register()  # again (ai.decoders did at import): nothing changes
    for tsyntax in (JPEGLossless, JPEGLosslessSV1):
        assert get_decoder(tsyntax).available_plugins.count(jpeg_lossless.LABEL) == 1


@pytest.mark.parametrize("bits, signed", [(8, False), (10, False), (12, False), (12, True),
                                          (15, False), (16, False), (16, True)])
@pytest.mark.parametrize("options", [("+e1",), ("+el", "+sv", "6"), ("+el", "+sv", "7"),
                                     ("+el", "+sv", "1")])
def test_samples_come_back_exactly(tmp_path: Path, bits: int, signed: bool,
                                   options: tuple[str, ...]) -> None:
    pixels = _pixels(bits, signed)
    ds = _encode(tmp_path, grey_dataset(pixels, bits_stored=bits), *options)
    expected_syntax = JPEGLosslessSV1 if options == ("+e1",) else JPEGLossless
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    ours = ai.pixels.decode_frame(ds)
    theirs = pydicom.pixels.pixel_array(ds, decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(ours, pixels)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == theirs.dtype


def test_colour_frames_go_to_pylibjpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    ds = _encode(tmp_path, grey_dataset(rgb, photometric="RGB"), "+e1")
    np.testing.assert_array_equal(ai.pixels.decode_frame(ds), rgb)


def test_a_codestream_that_is_not_jpeg_is_a_pixel_data_error(tmp_path: Path) -> None:
    ds = _encode(tmp_path, grey_dataset(_pixels(12, False), bits_stored=12), "+e1")
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(1000)])
    with pytest.raises(ai.pixels.PixelDataError, match="Cannot decode Pixel Data"):
        ai.pixels.decode_frame(ds)
