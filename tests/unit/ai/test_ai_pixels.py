"""DICOM -> display image -> model input: LUTs, inversion, sizes, real compressed files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aihelpers import grey_dataset
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from ai.pixels import (
    Letterbox,
    PreprocessParams,
    load_display_image,
    preprocess,
    preprocess_image,
)
from ai.types import PixelDataError

RAMP = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1]."""
    c, w = center - 0.5, width - 1
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def test_window_monochrome2() -> None:
    ds = grey_dataset(RAMP, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    out = load_display_image(ds)
    assert out.dtype == np.float32 and out.shape == (16, 16)
    np.testing.assert_allclose(out, linear_window(RAMP.astype(float), 2048, 1024), atol=1e-6)


def test_monochrome1_inverted_after_window() -> None:
    mono2 = load_display_image(
        grey_dataset(RAMP, bits_stored=12, WindowCenter=1000, WindowWidth=800)
    )
    ds1 = grey_dataset(
        RAMP, photometric="MONOCHROME1", bits_stored=12, WindowCenter=1000, WindowWidth=800
    )
    mono1 = load_display_image(ds1)
    # inverting after VOI: the window selects the same stored values, then flips them
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[0, 0] == 1.0 and mono1[-1, -1] == 0.0


def test_rescale_then_window_in_rescaled_units() -> None:
    ds = grey_dataset(
        RAMP, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000,
        WindowCenter=1000, WindowWidth=2000,
    )  # fmt: skip
    expected = linear_window(RAMP * 2.0 - 1000, 1000, 2000)
    np.testing.assert_allclose(load_display_image(ds), expected, atol=1e-6)


def test_sigmoid_voi_function() -> None:
    ds = grey_dataset(RAMP, bits_stored=12, WindowCenter=2048, WindowWidth=20)
    ds.VOILUTFunction = "SIGMOID"
    out = load_display_image(ds)
    expected = 1.0 / (1.0 + np.exp(np.clip(-4 * (RAMP - 2048.0) / 20, -700, 700)))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def _voi_lut_item(first: int, lut: np.ndarray, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, bits]
    item.LUTData = [int(v) for v in lut]
    return item


def test_voi_lut_sequence_preferred_over_window() -> None:
    lut = (np.sqrt(np.linspace(0, 1, 2048)) * 4095).astype(np.uint16)  # a gamma-like LUT
    ds = grey_dataset(RAMP, bits_stored=12, WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [_voi_lut_item(1024, lut, 12)]
    out = load_display_image(ds)
    idx = np.clip(RAMP.astype(int) - 1024, 0, len(lut) - 1)
    np.testing.assert_allclose(out, lut[idx] / 4095.0, atol=1e-6)


def test_voi_lut_after_float_rescale_does_not_warn() -> None:
    lut = np.arange(0, 4096, dtype=np.uint16)
    ds = grey_dataset(RAMP, bits_stored=12, RescaleSlope=1, RescaleIntercept=0)
    ds.VOILUTSequence = [_voi_lut_item(0, lut, 12)]
    np.testing.assert_allclose(load_display_image(ds), RAMP / 4095.0, atol=1e-6)


def test_percentile_window_when_no_voi() -> None:
    pixels = np.arange(10000, dtype=np.uint16).reshape(100, 100)
    out = load_display_image(grey_dataset(pixels), percentile_window=(1.0, 99.0))
    lo, hi = np.percentile(pixels, [1.0, 99.0])
    np.testing.assert_allclose(out, np.clip((pixels - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_invalid_window_falls_back_to_percentile() -> None:
    ds = grey_dataset(RAMP, bits_stored=12, WindowCenter=100, WindowWidth=0)
    out = load_display_image(ds)
    assert out.min() == 0.0 and out.max() == 1.0


def test_signed_pixels() -> None:
    pixels = (RAMP.astype(np.int32) - 2048).astype(np.int16)
    ds = grey_dataset(pixels, bits_stored=12, WindowCenter=0, WindowWidth=2048)
    np.testing.assert_allclose(load_display_image(ds), linear_window(pixels, 0, 2048), atol=1e-6)


def test_rgb_secondary_capture_to_grey() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = 200
    out = load_display_image(grey_dataset(rgb, photometric="RGB"))
    assert out.shape == (8, 8)
    assert out[:, :4].max() == 0.0 and out[:, 4:].min() == 1.0


def test_multiframe_uses_first_frame() -> None:
    frames = np.stack([RAMP, RAMP[::-1]])
    ds = grey_dataset(frames.reshape(32, 16), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ds.Rows, ds.NumberOfFrames = 16, 2
    np.testing.assert_allclose(load_display_image(ds), linear_window(RAMP, 2048, 4096), atol=1e-6)


def test_input_dataset_not_modified() -> None:
    ds = grey_dataset(RAMP, bits_stored=12, RescaleSlope="1.0", RescaleIntercept="0",
                      WindowCenter="2048.0", WindowWidth="1024")  # fmt: skip
    before = [(e.tag, e.VR, repr(e.value)) for e in ds]
    load_display_image(ds)
    assert [(e.tag, e.VR, repr(e.value)) for e in ds] == before


def test_header_size_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = grey_dataset(RAMP)
    ds.Rows, ds.Columns = 60000, 60000

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decode)
    with pytest.raises(PixelDataError, match="exceeds max_pixels"):
        load_display_image(ds)


def test_codestream_bomb_refused_before_decoding(
    realdicom: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(realdicom / "cr_chest_pa_philips_j2k.dcm")
    fragment = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    pos = fragment.find(b"\xff\x4f\xff\x51")
    fragment[pos + 8 : pos + 16] = struct.pack(">II", 60000, 60000)  # Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(fragment)])

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decode)
    with pytest.raises(PixelDataError, match="Codestream declares 60000 x 60000"):
        load_display_image(ds)


def test_truncated_pixel_data_is_pixel_data_error() -> None:
    ds = grey_dataset(RAMP)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDataError, match="Cannot decode") as info:
        load_display_image(ds)
    assert info.value.__cause__ is not None


def test_missing_pixel_data() -> None:
    ds = grey_dataset(RAMP)
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no Pixel Data"):
        load_display_image(ds)


def test_unsupported_photometric() -> None:
    with pytest.raises(PixelDataError, match="HSV"):
        load_display_image(grey_dataset(RAMP, photometric="HSV"))


def test_philips_monochrome1_jpeg2000(realdicom: Path) -> None:
    ds = pydicom.dcmread(realdicom / "cr_chest_pa_philips_j2k.dcm")
    img = load_display_image(ds)
    assert img.shape == (1955, 1841) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    rows = slice(700, 1100)
    spine, lungs = img[rows, 880:960].mean(), img[rows, 400:600].mean()
    assert spine > lungs + 0.1  # bone/mediastinum bright, lungs dark: not left inverted


def test_nih_8bit_secondary_capture(realdicom: Path) -> None:
    ds = pydicom.dcmread(realdicom / "dx_chest_nih_cxr14_sc.dcm")
    tensor, box = preprocess(ds, PreprocessParams(size=256))
    assert tensor.shape == (1, 256, 256) and tensor.dtype == np.float32
    assert box == Letterbox(1024, 1024, 256)
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_clahe_changes_contrast_inside_content_only() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.5, 0.05, (120, 60)), 0, 1).astype(np.float32)
    plain, box = preprocess_image(image, PreprocessParams(size=64))
    eq, _ = preprocess_image(image, PreprocessParams(size=64, clahe=True))
    content = box.crop(eq[0])
    assert content.std() > box.crop(plain[0]).std()
    assert eq[0, :, : box.offset_x].max() == 0.0  # padding stays zero
