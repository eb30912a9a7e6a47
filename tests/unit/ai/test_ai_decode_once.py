"""Decode once, only what the models need (issue 11): regression guards that COUNT decodes.

Each instance is decoded once per ``analyze`` call however many bundles (of different input
sizes and windows) run; a large JPEG 2000 image is decoded at a reduced resolution level
when the models are small, a large image of any other syntax is shrunk to the same size
right after its decode, and every result still lands in source pixels; per-finding
Grad-CAM maps are made only when asked for (the SEG output).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from aihelpers import LABELS, grey_dataset, make_bundle
from helpers.bundles import make_detector_bundle
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

import ai.pixels
from ai.decoders import decode_j2k_reduced, first_frame_bytes, j2k_header, j2k_reduce_level
from ai.inference import Analyzer
from ai.pixels import display_level, shrink
from ai.types import PixelDataError

SIDE = 2048
# a bright rectangle on edges that are multiples of 8 source pixels: one model pixel at 256
RECT = (1296, 1200, 1704, 1504)  # x0, y0, x1, y1 (pixel edges)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decode-once")
    make_bundle(root / "cls224", name="cls-224", size=224, thresholds=0.0)
    make_bundle(root / "cls256", name="cls-256", size=256, thresholds=0.0, seed=1,
                percentile_window=(1.0, 99.0))
    make_detector_bundle(root / "det256", size=256)
    return {p.name: p for p in root.iterdir()}


def _j2k(pixels: np.ndarray, bits_stored: int, **attributes: object) -> Dataset:
    ds = grey_dataset(pixels, bits_stored=bits_stored, **attributes)
    ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    return ds


@pytest.fixture(scope="module")
def phantom_pixels() -> np.ndarray:
    """2048 x 2048 12-bit: a textured background and one bright box."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    pixels = 500 + (xx + yy) // 8 + rng.integers(0, 200, (SIDE, SIDE))
    x0, y0, x1, y1 = RECT
    pixels[y0:y1, x0:x1] = 4000
    return pixels.astype(np.uint16)


@pytest.fixture(scope="module")
def j2k_phantom(phantom_pixels: np.ndarray) -> Dataset:
    """The phantom as JPEG 2000 lossless."""
    return _j2k(phantom_pixels, 12)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, tuple[int, ...]]]:
    """Every call of the one decode entry point: (SOP Instance UID, reduce, decoded shape)."""
    calls: list[tuple[str, int, tuple[int, ...]]] = []
    real = ai.pixels.decode_frame

    def counting(ds, *args, **kwargs):  # type: ignore[no-untyped-def]
        arr = real(ds, *args, **kwargs)
        calls.append((str(ds.SOPInstanceUID), int(kwargs.get("reduce", 0)), arr.shape))
        return arr

    monkeypatch.setattr(ai.pixels, "decode_frame", counting)
    return calls


def test_each_instance_decoded_once_per_call_whatever_the_bundles(
    bundles: dict[str, Path], decodes: list
) -> None:
    """Classifier 224 + classifier 256 with another window + detector 256: one decode each."""
    rng = np.random.default_rng(0)
    images = [grey_dataset(rng.integers(0, 4096, (300 + 20 * i, 260), dtype=np.uint16),
                           bits_stored=12) for i in range(3)]  # fmt: skip
    analyzer = Analyzer([bundles["cls224"], bundles["cls256"], bundles["det256"]], device="cpu")
    results = analyzer.analyze(images)
    uids = [str(ds.SOPInstanceUID) for ds in images]
    assert Counter(uid for uid, _, _ in decodes) == Counter(uids)
    analyzer.analyze(images[:1])
    assert Counter(uid for uid, _, _ in decodes)[uids[0]] == 2  # once per call
    for result, ds in zip(results, images, strict=True):
        assert {f.model.name for f in result.findings} == {"cls-224", "cls-256",
                                                          "tiny-test-detector"}
        assert result.display is not None and result.display.shape == (ds.Rows, ds.Columns)
        assert result.heatmap is not None and result.heatmap.shape == (ds.Rows, ds.Columns)


def test_j2k_reduce_level_follows_models_and_display(j2k_phantom: Dataset) -> None:
    header = j2k_header(first_frame_bytes(j2k_phantom))
    assert header is not None and (header.rows, header.columns, header.precision) == (
        SIDE, SIDE, 12)
    assert header.levels >= 3
    assert j2k_reduce_level(j2k_phantom, 1024) == 1
    assert j2k_reduce_level(j2k_phantom, 512) == 2
    assert j2k_reduce_level(j2k_phantom, 4096) == 0
    assert j2k_reduce_level(grey_dataset(np.zeros((SIDE, SIDE), np.uint16)), 64) == 0


def test_large_j2k_decoded_reduced_with_results_in_source_pixels(
    bundles: dict[str, Path], j2k_phantom: Dataset, decodes: list
) -> None:
    """Models 224/256 with the default display_min_side (1024): level 1, decoded 1024 px;
    boxes and heatmaps come back in the 2048 px source."""
    analyzer = Analyzer([bundles["cls224"], bundles["det256"]], device="cpu")
    (result,) = analyzer.analyze([j2k_phantom])
    ((uid, level, shape),) = decodes
    assert uid == j2k_phantom.SOPInstanceUID and level >= 1
    assert shape == (SIDE >> level, SIDE >> level) == (1024, 1024)
    assert result.display is not None and result.display.shape == shape
    assert min(result.display.shape) >= analyzer.display_min_side
    assert result.heatmap is not None and result.heatmap.shape == (SIDE, SIDE)
    boxes = [f.box for f in result.findings if f.box is not None]
    assert any(f.model.task == "detection" for f in result.findings)
    for box in boxes:
        assert 0 <= box.x0 < box.x1 <= SIDE and 0 <= box.y0 < box.y1 <= SIDE


def _cam_is_input_box(analyzer: Analyzer, ds: Dataset, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The Grad-CAM replaced by the model input itself: the box must enclose the bright
    rectangle, so it shows where the letterbox puts a model box in the source."""
    runner = analyzer._runners[0]

    def fake_forward(batch: object) -> tuple[np.ndarray, dict]:
        arr = np.asarray(batch)
        return np.ones((arr.shape[0], len(LABELS))), {(b, 0): arr[b, 0] for b in range(len(arr))}

    monkeypatch.setattr(runner, "_forward", fake_forward)
    (result,) = analyzer.analyze([ds])
    return result.findings[0].box


@pytest.fixture(scope="module")
def phantom_syntaxes(phantom_pixels: np.ndarray, j2k_phantom: Dataset) -> dict[str, Dataset]:
    """The same phantom in four transfer syntaxes (each a dataset of its own UID)."""
    out = {"JPEG 2000": j2k_phantom, "uncompressed": grey_dataset(phantom_pixels, bits_stored=12)}
    for name, uid, plugin in (("RLE", RLELossless, "pylibjpeg"),
                              ("JPEG-LS", JPEGLSLossless, "pyjpegls")):
        ds = grey_dataset(phantom_pixels, bits_stored=12)
        ds.compress(uid, phantom_pixels, encoding_plugin=plugin)
        out[name] = ds
    return out


def test_large_image_of_any_syntax_analysed_at_the_reduced_jpeg2000_size(
    bundles: dict[str, Path], phantom_syntaxes: dict[str, Dataset], decodes: list
) -> None:
    """Models 224/256, display_min_side 1024: a 2048 px image is analysed at 1024 px whatever
    its syntax (JPEG 2000 decoded at level 1, the others decoded once and shrunk), so the
    overlay is the same size and the models see the same picture; results in source pixels."""
    analyzer = Analyzer([bundles["cls224"], bundles["det256"]], device="cpu")
    names = list(phantom_syntaxes)
    results = dict(zip(names, analyzer.analyze(list(phantom_syntaxes.values())), strict=True))
    assert [(uid, level, shape) for uid, level, shape in decodes] == [
        (str(ds.SOPInstanceUID), 1, (1024, 1024)) for ds in phantom_syntaxes.values()]
    reference = results["JPEG 2000"]
    assert reference.display is not None
    for name, result in results.items():
        assert result.display is not None and result.display.shape == (1024, 1024), name
        assert result.heatmap is not None and result.heatmap.shape == (SIDE, SIDE), name
        # the wavelet's low-pass band and the 2 x 2 mean of the same pixels: the same picture
        # (they filter the phantom's per-pixel noise differently: about 2 of 255 levels)
        diff = np.abs(result.display.astype(int) - reference.display.astype(int))
        assert float(diff.mean()) < 0.01 * 255 and np.percentile(diff, 99) <= 8, name
        probabilities = {f.label: f.probability for f in result.findings
                         if f.model.name == "cls-224"}
        expected = {f.label: f.probability for f in reference.findings
                    if f.model.name == "cls-224"}
        assert probabilities == pytest.approx(expected, abs=0.01), name
        for f in result.findings:
            if f.box is not None:
                assert 0 <= f.box.x0 < f.box.x1 <= SIDE and 0 <= f.box.y0 < f.box.y1 <= SIDE
    # the lossless syntaxes decode to the same stored values: identical results
    for name in ("RLE", "JPEG-LS"):
        np.testing.assert_array_equal(results[name].display, results["uncompressed"].display)


@pytest.mark.parametrize("syntax", ["JPEG 2000", "uncompressed"])
def test_box_on_a_reduced_image_maps_to_the_same_source_box(
    bundles: dict[str, Path], phantom_syntaxes: dict[str, Dataset], decodes: list,
    monkeypatch: pytest.MonkeyPatch, syntax: str,
) -> None:
    """Level 2 (a JPEG 2000 decoded at it, an uncompressed image shrunk to it): the box
    lands where the full-size analysis puts it, within one model pixel of the rectangle."""
    ds = phantom_syntaxes[syntax]
    full = Analyzer([bundles["cls256"]], device="cpu", display_min_side=SIDE)
    reduced = Analyzer([bundles["cls256"]], device="cpu", display_min_side=0)  # level 2
    box_full = _cam_is_input_box(full, ds, monkeypatch)
    box_reduced = _cam_is_input_box(reduced, ds, monkeypatch)
    assert [(level, shape) for _, level, shape in decodes] == [(0, (SIDE, SIDE)),
                                                                (2, (512, 512))]
    assert box_full is not None and box_reduced is not None
    full_edges = (box_full.x0, box_full.y0, box_full.x1, box_full.y1)
    reduced_edges = (box_reduced.x0, box_reduced.y0, box_reduced.x1, box_reduced.y1)
    assert reduced_edges == pytest.approx(full_edges, abs=2.0)
    assert reduced_edges == pytest.approx(RECT, abs=SIDE / 256)  # within one model pixel


def test_display_level_per_image_kind() -> None:
    """Grey frames of any syntax get the deepest level keeping the short side; colour and
    palette images stay whole (averaging palette indices would mix colours)."""
    grey = grey_dataset(np.zeros((3000, 2500), np.uint16), bits_stored=12)
    assert display_level(grey, 1024) == 1  # 1500 x 1250
    assert display_level(grey, 512) == 2  # 750 x 625
    assert display_level(grey, 1251) == 0
    assert display_level(grey_dataset(np.zeros((2046, 3000), np.uint16)), 1024) == 0
    assert display_level(grey_dataset(np.zeros((2048, 2048), np.uint8)), 1024) == 1
    assert display_level(grey_dataset(np.zeros((2048, 2048, 3), np.uint8),
                                      photometric="RGB"), 256) == 0
    palette = grey_dataset(np.zeros((2048, 2048), np.uint8), photometric="PALETTE COLOR")
    assert display_level(palette, 256) == 0


@pytest.mark.parametrize("dtype", ["u1", "u2", "i2", "i4", "f4"])
def test_shrink_means_the_covered_values_and_rounds_sizes_up(dtype: str) -> None:
    """Sizes as a reduced JPEG 2000 decode rounds them; a flat block keeps its exact value,
    a 2 x 2 block becomes its mean; the stored type is kept."""
    pixels = np.full((1025, 999), 7, dtype=dtype)
    pixels[0:2, 0:2] = np.array([[10, 20], [30, 40]], dtype=dtype)
    for level, shape in ((1, (513, 500)), (2, (257, 250)), (3, (129, 125))):
        out = shrink(pixels, level)
        assert out.dtype == pixels.dtype and out.shape == shape
        assert out[-1, -1] == pytest.approx(7, abs=1e-5)
        assert out[shape[0] // 2, shape[1] // 2] == pytest.approx(7, abs=1e-5)
    assert shrink(pixels, 1)[0, 0] == pytest.approx(25, abs=1e-4)
    assert shrink(pixels, 0) is pixels
    with pytest.raises(PixelDataError):
        shrink(np.zeros((8, 8, 3), np.uint8), 1)


@pytest.mark.parametrize("bits, signed", [(12, True), (8, False), (16, False)])
def test_reduced_decode_keeps_stored_values(bits: int, signed: bool) -> None:
    """Pillow widens N-bit samples (and offsets signed ones); the reduced decode undoes it:
    a flat image keeps its exact value, a ramp its range, at every level."""
    dtype = np.dtype(f"{'i' if signed else 'u'}{2 if bits > 8 else 1}")
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    ramp = np.linspace(lo, hi, 256).round().astype(dtype)
    pixels = np.tile(ramp, (128, 1))
    pixels[:, 64:] = pixels[:, 64:96].mean().astype(dtype)  # a flat block of one value
    ds = _j2k(pixels, bits)
    for level in (1, 2):
        out = decode_j2k_reduced(ds, level)
        assert out.dtype == dtype and out.shape == (128 >> level, 256 >> level)
        assert out[:, -1].tolist() == [pixels[0, -1]] * out.shape[0]
        assert abs(int(out.min()) - lo) <= (hi - lo) // 64


@pytest.mark.parametrize("name", ["cr_hip_fuji_j2k.dcm", "cr_chest_pa_philips_j2k.dcm"])
def test_vendor_j2k_reduced_display_matches_the_full_one(realdicom: Path, name: str) -> None:
    """Vendor lossy JPEG 2000 (10 and 15 bit): the reduced decode looks like the full image
    shrunk, so the models and the overlay see the same picture."""
    ds = pydicom.dcmread(realdicom / name)
    level = j2k_reduce_level(ds, 128)
    assert level >= 1
    reduced = ai.pixels.load_display_image(ds, reduce=level)
    full = ai.pixels.load_display_image(ds)
    assert reduced.shape == tuple(-(-n // 2**level) for n in full.shape)
    shrunk = cv2.resize(full, reduced.shape[::-1], interpolation=cv2.INTER_AREA)
    assert float(np.abs(reduced - shrunk).mean()) < 0.01


def test_finding_heatmaps_only_when_asked(bundles: dict[str, Path]) -> None:
    image = grey_dataset(np.random.default_rng(2).integers(0, 4096, (200, 150), np.uint16),
                         bits_stored=12)
    (plain,) = Analyzer([bundles["cls224"]], device="cpu").analyze([image])
    (seg,) = Analyzer([bundles["cls224"]], device="cpu", finding_maps=True).analyze([image])
    assert plain.finding_heatmaps == {}
    assert set(seg.finding_heatmaps) == {(f.model.device_uid, f.label)
                                         for f in seg.positive_findings}
    assert plain.heatmap is not None and seg.heatmap is not None
    np.testing.assert_array_equal(plain.heatmap, seg.heatmap)
    np.testing.assert_array_equal(np.max(list(seg.finding_heatmaps.values()), axis=0),
                                  seg.heatmap)


def test_truncated_j2k_is_refused_at_any_level() -> None:
    """A reduced decode that fails falls back to the full one, which names the problem."""
    pixels = np.random.default_rng(3).integers(0, 4096, (256, 256)).astype(np.uint16)
    ds = _j2k(pixels, 12)
    ds.PixelData = encapsulate([first_frame_bytes(ds)[:5000]])
    for level in (0, 1):
        with pytest.raises(PixelDataError, match="Cannot decode Pixel Data"):
            ai.pixels.decode_frame(ds, reduce=level)
