"""JPEG-LS Lossless results encoded by CharLS through imagecodecs (``dicom_node.delivery.jpegls``):
what it writes must decode to exactly the source samples with pyjpegls and with DCMTK's
``dcmdjpls`` (what a PACS may use), and the node must use it for its SCs, off the job's
main thread (``build_outputs``)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import jpeg_ls
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from dicom_node.delivery import jpegls, syntaxes


def _image(samples: int, bits: int, planar: int = 0) -> Dataset:
    """An odd-sized image with ramps, flat areas and noise over the whole range of ``bits``."""
    rows, cols = 131, 97
    rng = np.random.default_rng(samples * 100 + bits + planar)
    top = (1 << bits) - 1
    ramp = np.linspace(0, top, cols)[None, :].repeat(rows, 0)
    grey = np.where(rng.random((rows, cols)) < 0.3, rng.integers(0, top + 1, (rows, cols)), ramp)
    grey[:10] = 0
    grey[-10:] = top
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    pixels = (grey.astype(dtype) if samples == 1
              else np.stack([grey, grey[::-1], ramp], axis=-1).astype(dtype))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    data = pixels.transpose(2, 0, 1) if samples == 3 and planar else pixels
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    return ds


@pytest.mark.parametrize(("samples", "bits", "planar", "noise"),
                         [(3, 8, 0, False), (3, 8, 1, False), (1, 8, 0, False),
                          (1, 16, 0, False), (3, 8, 0, True), (1, 16, 0, True)])
def test_imagecodecs_codestream_decodes_to_the_source_samples(
    tmp_path: Path, samples: int, bits: int, planar: int, noise: bool,
) -> None:
    """Noise: pure random samples, which JPEG-LS expands beyond the raw size."""
    ds = _image(samples, bits, planar)
    if noise:
        raw = np.frombuffer(ds.PixelData, np.uint8)
        ds.PixelData = np.random.default_rng(7).integers(0, 256, raw.size, np.uint8).tobytes()
    want = ds.pixel_array.copy()
    calls: list[int] = []
    real = imagecodecs.jpegls_encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imagecodecs, "jpegls_encode",
                   lambda a, *k, **kw: calls.append(1) or real(a, *k, **kw))
        syntaxes.compress(ds, JPEGLSLossless)
    assert calls == [1]  # the node's JPEG-LS encoder is CharLS through imagecodecs
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "jls.dcm")
    np.testing.assert_array_equal(back.pixel_array, want)  # pydicom's pyjpegls decoder
    if shutil.which("dcmdjpls") is None:
        pytest.skip("needs DCMTK")
    out = tmp_path / "dcmtk.dcm"
    done = subprocess.run(["dcmdjpls", str(tmp_path / "jls.dcm"), str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, want)


def test_other_layouts_go_to_pyjpegls_unchanged() -> None:
    """12 bits in 16 (not a full word): pyjpegls, as before, and still lossless."""
    ds = _image(1, 16)
    ds.BitsStored, ds.HighBit = 12, 11
    arr = (np.frombuffer(ds.PixelData, "<u2") >> 4).astype("<u2")
    ds.PixelData = arr.tobytes()
    want = ds.pixel_array.copy()
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imagecodecs, "jpegls_encode", lambda *a, **k: calls.append(1))
        syntaxes.compress(ds, JPEGLSLossless)
    assert calls == []
    np.testing.assert_array_equal(ds.pixel_array, want)


def test_plugin_is_registered_once_and_preferred() -> None:
    jpegls.register()  # again (syntaxes did at import): nothing changes
    plugins = get_encoder(JPEGLSLossless).available_plugins
    assert plugins.count(jpegls.LABEL) == 1
    assert syntaxes._plugin(syntaxes._FASTEST_ENCODERS, JPEGLSLossless,
                            list(plugins)) == jpegls.LABEL
    # without it installed the node falls back to pyjpegls
    assert syntaxes._plugin(syntaxes._FASTEST_ENCODERS, JPEGLSLossless,
                            ["pyjpegls"]) == "pyjpegls"
    assert not jpegls.is_available("1.2.840.10008.1.2.4.81")  # near-lossless: not ours


def _ticks_during(encode: Callable[[], object]) -> int:
    """How far this thread counts while another thread runs ``encode`` once. A GIL-holding
    encoder stops the count for its whole call (the counter only gets the switch slices
    around it); a releasing one lets it count throughout."""
    started = threading.Event()

    def run() -> None:
        started.set()
        encode()

    encoder = threading.Thread(target=run)
    encoder.start()
    started.wait(10)
    ticks = 0
    while encoder.is_alive():
        ticks += 1
    encoder.join()
    return ticks


def test_encoding_releases_the_gil() -> None:
    ds = _image(3, 8)
    frame = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 3)
    big = np.ascontiguousarray(np.tile(frame, (12, 12, 1)))  # 1572 x 1164 RGB, as an SC
    released = _ticks_during(lambda: imagecodecs.jpegls_encode(big))
    held = _ticks_during(lambda: jpeg_ls.encode_array(big, lossy_error=0, interleave_mode=2))
    print(f"counted during one encoding: imagecodecs {released}, pyjpegls {held}")
    assert released > 10_000 and released > 5 * held, (released, held)
