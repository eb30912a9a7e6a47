"""Outputs that cost little, with the same content: the uint8 heatmap blend against the float
one it replaced, slim reference datasets against full ones, the SC compressed losslessly and
drawn at a display size smaller than the source."""

from __future__ import annotations

import datetime
import io
import os
import threading
from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np
import pydicom
import pytest
from outputs_helpers import make_result, make_source
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from ai.types import BoundingBox
from dicom_node.config import load_settings
from dicom_node.delivery.syntaxes import fastest_lossless
from dicom_node.errors import ConfigError
from dicom_node.outputs import OutputSettings, build_outputs
from dicom_node.outputs.common import (
    OutputObject,
    is_bulk,
    prepare_sources,
    stamp_created,
)
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.heatmap import build_seg
from dicom_node.outputs.render import BOX_COLOURS, HEAT_THRESHOLD, blend_heatmap, heat_levels
from dicom_node.outputs.sc import build_sc, encode_sc, render_overlay
from dicom_node.outputs.sr import build_sr

CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5)


def _float_blend(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> None:
    """The blend as it was before issue 11 (float RGB, boolean gather/scatter): the
    reference the uint8 one must match."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0), 0.0, 1.0)
    mask = heat > HEAT_THRESHOLD
    if not mask.any():
        return
    colour = cv2.applyColorMap((heat[mask] * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    colour = colour.reshape(-1, 3)[:, ::-1].astype(np.float32)
    base = rgb[mask].astype(np.float32)
    rgb[mask] = np.clip(base * (1.0 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def _phantom_heat(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    heat = np.exp(-((x - cols / 2) ** 2 + (y - rows / 3) ** 2) / (2 * (rows / 5) ** 2))
    heat = heat.astype(np.float32) * 1.2 - 0.1  # below 0 and above 1 too
    heat[0, :5] = np.nan
    return heat


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_uint8_blend_matches_the_float_blend(alpha: float) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (240, 320), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    heat = _phantom_heat(240, 320)
    old, new = rgb.copy(), rgb.copy()
    _float_blend(old, heat, alpha)
    blend_heatmap(new, heat, alpha)
    hot = np.nan_to_num(heat, nan=0.0) > HEAT_THRESHOLD
    assert hot.sum() > 1000 and (~hot).sum() > 1000  # both regions are exercised
    diff = np.abs(old.astype(np.int16) - new.astype(np.int16))
    assert diff[hot].max() <= 1  # rounding of the weighted sum only
    assert (new[~hot] == rgb[~hot]).all()  # no heat: the grey image, untouched


@pytest.mark.parametrize("shape", [(120, 160), (480, 640)])  # shrunk, enlarged
def test_heat_resized_to_the_overlay_counts_nan_as_no_heat(shape: tuple[int, int]) -> None:
    """A map at source size drawn on a smaller (or larger) overlay: NaN is 0 before the
    resize, as ``nan_to_num`` made it, and the caller's map is left as it was."""
    heat = _phantom_heat(240, 320)
    heat[61:64, 151:154] = np.nan  # inside the hot area, across 2 x 2 blocks: partly hot
    before = heat.copy()
    levels, mask = heat_levels(heat, shape)
    want = np.clip(cv2.resize(np.nan_to_num(heat, nan=0.0), shape[::-1],
                              interpolation=cv2.INTER_AREA if shape[0] < 240
                              else cv2.INTER_LINEAR), 0.0, 1.0)
    np.testing.assert_array_equal(levels, (want * 255.0).astype(np.uint8))
    np.testing.assert_array_equal(mask, (want > HEAT_THRESHOLD).astype(np.uint8))
    np.testing.assert_array_equal(heat, before)  # NaN still there: patched on a copy


def test_blend_without_heat_above_threshold_leaves_the_image() -> None:
    rgb = np.full((50, 60, 3), 77, np.uint8)
    blend_heatmap(rgb, np.full((50, 60), HEAT_THRESHOLD, np.float32), 0.5)
    assert (rgb == 77).all()


# -- slim reference datasets -----------------------------------------------------------------


def _items() -> list[tuple[Dataset, object]]:
    ds = make_source(modality="DX", rows=300, cols=200)
    ds.IconImageSequence = [Dataset()]
    ds.IconImageSequence[0].Rows = 8
    ds.add_new(0x60003000, "OW", b"\x00" * 64)  # overlay data: bulk, never referenced
    return [(ds, make_result(ds, box=BoundingBox(20, 100, 120, 200),
                             heat_box=(230, 280, 130, 190)))]


_BUILDERS = {"sr": build_sr, "sc": build_sc, "gsps": build_gsps, "seg": build_seg}


def _built(kind: str, *, slim: bool) -> list[OutputObject]:
    settings = OutputSettings(seg=True)
    objects = _BUILDERS[kind](prepare_sources(_items(), slim=slim), settings, "seed")
    objects = objects if isinstance(objects, list) else [objects]
    for obj in objects:
        stamp_created(obj, CREATED)
    return objects


# What highdicom makes itself on every call: its clock (the Contributing Equipment item it
# adds for itself) and a random Dimension Organization UID (SEG).
_GENERATED = ("ContributionDateTime", "DimensionOrganizationUID")


def _elements(ds: Dataset) -> dict[str, object]:
    """Every element by tag, sequences recursively, but for :data:`_GENERATED`."""
    out: dict[str, object] = {}
    for elem in ds:
        if elem.keyword in _GENERATED:
            continue
        if elem.VR == "SQ":
            out[str(elem.tag)] = [_elements(item) for item in elem.value]
        else:
            out[str(elem.tag)] = elem.value
    return out


@pytest.mark.parametrize("kind", ["sr", "sc", "gsps", "seg"])
def test_slim_sources_build_the_same_objects(kind: str) -> None:
    full, slim = _built(kind, slim=False), _built(kind, slim=True)
    assert len(full) == len(slim) >= 1
    for a, b in zip(full, slim, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        assert _elements(a.dataset) == _elements(b.dataset)


def test_reference_datasets_carry_no_bulk_data() -> None:
    """The regression guard: what highdicom deep-copies is header only (counted in tags)."""
    (source,) = prepare_sources(_items())
    assert [str(e.tag) for e in source.work if is_bulk(e.tag)] == []
    assert "PixelData" in source.pixels and "PixelData" in source.original
    assert "IconImageSequence" not in source.work and "IconImageSequence" in source.original


# -- the SC: compressed, at the display size ------------------------------------------------


def test_sc_is_written_in_the_fastest_lossless_syntax(
    dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    assert fastest_lossless() == JPEGLSLossless  # pyjpegls is a dependency of the node
    ds = make_source(rows=300, cols=200)
    result = make_result(ds, box=BoundingBox(20, 100, 120, 200), heat_box=(230, 280, 130, 190))
    settings = OutputSettings(sr=False, gsps=False)
    (sc,) = build_outputs([(ds, result)], settings, "seed")
    assert sc.dataset.file_meta.TransferSyntaxUID == JPEGLSLossless
    (source,) = prepare_sources([(ds, result)])
    assert (sc.dataset.pixel_array == render_overlay(source, settings).pixels).all()  # lossless
    assert dciodvfy_errors(sc.dataset, "sc") == []


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian, RLELossless])
def test_sc_syntax_is_configurable(syntax: str) -> None:
    ds = make_source(rows=120, cols=100)
    settings = OutputSettings(sr=False, gsps=False)
    (reference,) = build_outputs([(ds, make_result(ds))], settings, "s")
    (sc,) = build_outputs([(ds, make_result(ds))],
                          replace(settings, sc_transfer_syntax=syntax), "s")
    written = pydicom.dcmread(_roundtrip(sc.dataset))
    assert written.file_meta.TransferSyntaxUID == syntax
    assert (written.pixel_array == reference.dataset.pixel_array).all()


def test_sc_syntax_must_be_lossless_and_encodable() -> None:
    with pytest.raises(ValueError, match="only lossless"):
        OutputSettings(sc_transfer_syntax="JPEGBaseline8Bit")
    with pytest.raises(ValueError, match="sc_max_side must be at least 256"):
        OutputSettings(sc_max_side=100)
    with pytest.raises(ConfigError, match="outputs.sc_transfer_syntax: .*lossy"):
        load_settings(None, environ={}, overrides={"outputs": {"sc_transfer_syntax": "JPEG2000"}})
    settings = load_settings(None, environ={}, overrides={"outputs": {"sc_max_side": 1024}})
    assert settings.outputs.sc_transfer_syntax == str(JPEGLSLossless)
    assert settings.outputs.sc_max_side == 1024


def _yellow(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == BOX_COLOURS[0], axis=2)


def test_sc_drawn_at_a_reduced_display_size_scales_boxes_and_heat(
    dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    """A display image at half the source size (a reduced J2K resolution level): the SC
    has its size, the box and heat land where they are in the source, scaled; the GSPS and
    SR keep source pixels."""
    ds = make_source(modality="DX", rows=600, cols=400)
    box = BoundingBox(40, 200, 240, 400)  # source pixels
    result = make_result(ds, box=box, heat_box=(460, 560, 260, 380))
    full = render_overlay(prepare_sources([(ds, result)])[0], OutputSettings()).pixels
    result.display = cv2.resize(full[:, :, 1], (200, 300), interpolation=cv2.INTER_AREA)
    result.display = np.ascontiguousarray(result.display)
    outputs = build_outputs([(ds, result)], OutputSettings(), "seed")
    sc = next(o.dataset for o in outputs if o.kind == "sc")
    assert (sc.Rows, sc.Columns) == (300, 200)
    assert "PixelSpacing" not in sc and "ImagerPixelSpacing" not in sc
    pixels = sc.pixel_array
    rows, cols = np.nonzero(_yellow(pixels[100:, :]))  # below the banner
    assert (cols.min(), cols.max()) == (20, 119)  # columns 40..239 of the source, halved
    assert (rows.min() + 100, rows.max() + 100) == (100, 199)
    heat = pixels[230:280, 130:190].astype(int)
    assert (np.abs(heat[:, :, 0] - heat[:, :, 2]) > 20).mean() > 0.9  # coloured, not grey
    outline = (40.0, 200.0, 240.0, 200.0, 240.0, 400.0, 40.0, 400.0, 40.0, 200.0)
    for kind in ("gsps", "sr"):  # the box in source pixels, as before
        dataset = next(o.dataset for o in outputs if o.kind == kind)
        assert outline in set(_graphic_data(dataset)), kind
    assert dciodvfy_errors(sc, "sc") == []


def _graphic_data(ds: Dataset) -> list[tuple[float, ...]]:
    """Every GraphicData in ``ds``, at any depth (SR content tree, GSPS layers)."""
    found = [tuple(float(v) for v in ds.GraphicData)] if "GraphicData" in ds else []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found += _graphic_data(item)
    return found


def test_sc_max_side_shrinks_the_overlay() -> None:
    ds = make_source(rows=600, cols=400)
    result = make_result(ds, box=BoundingBox(40, 200, 240, 400))
    (sc,) = build_outputs([(ds, result)],
                          OutputSettings(sr=False, gsps=False, sc_max_side=300), "seed")
    assert (sc.dataset.Rows, sc.dataset.Columns) == (300, 200)
    pixels = pydicom.dcmread(_roundtrip(sc.dataset)).pixel_array
    rows, cols = np.nonzero(_yellow(pixels[100:, :]))
    assert (cols.min(), cols.max()) == (20, 119)


def _roundtrip(ds: Dataset) -> io.BytesIO:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return buf


# -- the SC built beside the SR and GSPS -----------------------------------------------------


def _two_images() -> list[tuple[Dataset, object]]:
    """A PA and a lateral of one study (two SCs)."""
    items = []
    for k, (rows, cols) in enumerate([(300, 200), (260, 240)], start=1):
        ds = make_source(modality="DX", rows=rows, cols=cols,
                         sop_uid=f"1.2.826.0.1.3680043.8.498.2.{k}")
        items.append((ds, make_result(ds, box=BoundingBox(20, 100, 120, 200),
                                      heat_box=(130, 180, 30, 90))))
    return items


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the SCs take turns")
def test_scs_are_built_side_by_side_with_the_same_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``build_outputs`` encodes each image's SC on a thread of its own while the SR and
    GSPS are built (the JPEG-LS encoding releases the GIL): both SCs of a two-image study
    must be encoding at once (a barrier both must reach, else it breaks), and the set, its
    order and every element are what the builders make one after the other."""
    import dicom_node.outputs as outputs_pkg

    threads: list[str] = []
    both = threading.Barrier(2, timeout=30)

    def recording_encode_sc(*args: object, **kwargs: object) -> OutputObject:
        threads.append(threading.current_thread().name)
        both.wait()  # BrokenBarrierError when the two SCs are encoded one after the other
        return encode_sc(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs_pkg, "encode_sc", recording_encode_sc)
    settings = OutputSettings(seg=True)
    items = _two_images()
    together = build_outputs(items, settings, "seed", created=CREATED)
    assert len(set(threads)) == 2 and threading.current_thread().name not in threads
    one_by_one = []
    for kind in ("sr", "sc", "gsps", "seg"):
        objects = _BUILDERS[kind](prepare_sources(items), settings, "seed")
        for obj in objects if isinstance(objects, list) else [objects]:
            stamp_created(obj, CREATED)
            one_by_one.append(obj)
    assert [o.kind for o in together].count("sc") == 2
    assert [o.kind for o in together] == [o.kind for o in one_by_one]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        ours = _elements(a.dataset)
        ours.pop("(0018,A001)")  # the algorithm equipment build_outputs adds to every object
        assert ours == {k: v for k, v in _elements(b.dataset).items() if k != "(0018,A001)"}


def test_an_sc_that_fails_fails_the_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.outputs as outputs_pkg

    def broken(*_: object, **__: object) -> OutputObject:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(outputs_pkg, "encode_sc", broken)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        build_outputs(_items(), OutputSettings(), "seed", created=CREATED)
