"""Letterbox geometry: what is drawn in model space must land on the right source pixels.

Tolerance: half a model pixel expressed in source pixels (0.5 / scale), for every aspect
ratio, odd sizes included.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai.pixels import Letterbox
from ai.types import BoundingBox

sides = st.integers(min_value=5, max_value=700)
model_sizes = st.sampled_from([32, 64, 97, 224, 256])
fractions = st.floats(min_value=0.0, max_value=1.0)


def centroid(image: np.ndarray) -> tuple[float, float]:
    """Mass centroid in pixel-edge coordinates (pixel centres at i + 0.5)."""
    rows, cols = np.indices(image.shape)
    mass = image.sum()
    return float(((cols + 0.5) * image).sum() / mass), float(((rows + 0.5) * image).sum() / mass)


@given(h=sides, w=sides, size=model_sizes)
def test_geometry_invariants(h: int, w: int, size: int) -> None:
    box = Letterbox(h, w, size)
    assert max(box.new_height, box.new_width) == size
    assert (
        abs(box.scale_x - box.scale) <= 1 / w + 1e-12
        and abs(box.scale_y - box.scale) <= 1 / h + 1e-12
    )
    assert 0 <= box.offset_x and box.offset_x + box.new_width <= size
    assert 0 <= box.offset_y and box.offset_y + box.new_height <= size
    # the corners of the source map onto the corners of the content
    assert box.to_model(0, 0) == (box.offset_x, box.offset_y)
    x1, y1 = box.to_model(w, h)
    assert x1 == pytest.approx(box.offset_x + box.new_width)
    assert y1 == pytest.approx(box.offset_y + box.new_height)


@given(h=sides, w=sides, size=model_sizes, fx=fractions, fy=fractions)
def test_point_round_trip(h: int, w: int, size: int, fx: float, fy: float) -> None:
    box = Letterbox(h, w, size)
    x, y = fx * w, fy * h
    assert box.to_source(*box.to_model(x, y)) == pytest.approx((x, y), abs=1e-9 * max(h, w))
    mx, my = fx * size, fy * size
    assert box.to_model(*box.to_source(mx, my)) == pytest.approx((mx, my), abs=1e-9 * size)


@settings(max_examples=60, deadline=None)
@given(h=sides, w=sides, size=model_sizes, fx=fractions, fy=fractions)
def test_source_blob_lands_where_to_model_says(
    h: int, w: int, size: int, fx: float, fy: float
) -> None:
    """A bright block in the source shows up in model space at to_model(its centroid)."""
    box = Letterbox(h, w, size)
    bh, bw = max(1, int(np.ceil(3 / box.scale_y))), max(1, int(np.ceil(3 / box.scale_x)))
    bh, bw = min(bh, h), min(bw, w)
    # when enlarging, bilinear interpolation clamps at the image border (edge replication), a
    # property of interpolation, not of the mapping: keep the block one pixel off the border
    m = 1 if box.scale > 1 and min(h - bh, w - bw) >= 2 else 0
    r0, c0 = m + int(fy * (h - bh - 2 * m)), m + int(fx * (w - bw - 2 * m))
    source = np.zeros((h, w), np.float32)
    source[r0 : r0 + bh, c0 : c0 + bw] = 1.0
    model = box.apply(source)
    got = box.to_source(*centroid(model))
    tol = 0.5 / min(box.scale_x, box.scale_y)
    assert got == pytest.approx(centroid(source), abs=tol)


@settings(max_examples=60, deadline=None)
@given(h=sides, w=sides, size=model_sizes, fx=fractions, fy=fractions)
def test_model_heatmap_lands_where_to_source_says(
    h: int, w: int, size: int, fx: float, fy: float
) -> None:
    """A blob drawn in model space peaks in the source heatmap at to_source(its centre)."""
    box = Letterbox(h, w, size)
    margin = 4.0  # keep the blob off the content edge, where interpolation clamps
    if box.new_width < 2 * margin + 1 or box.new_height < 2 * margin + 1:
        return
    mx = box.offset_x + margin + fx * (box.new_width - 2 * margin)
    my = box.offset_y + margin + fy * (box.new_height - 2 * margin)
    rows, cols = np.indices((size, size)) + 0.5
    blob = np.exp(-((cols - mx) ** 2 + (rows - my) ** 2) / (2 * 1.0**2)).astype(np.float32)
    heat = box.heatmap_to_source(blob)
    assert heat.shape == (h, w) and heat.dtype == np.float32
    sx, sy = box.to_source(mx, my)
    cx, cy = centroid(heat * (heat > 0.05 * heat.max()))
    tol = 0.5 / min(box.scale_x, box.scale_y) + 0.5
    assert (cx, cy) == pytest.approx((sx, sy), abs=tol)


@given(h=sides, w=sides, size=model_sizes)
def test_box_to_source(h: int, w: int, size: int) -> None:
    box = Letterbox(h, w, size)
    content = (
        box.offset_x,
        box.offset_y,
        box.offset_x + box.new_width,
        box.offset_y + box.new_height,
    )
    got = box.box_to_source(content)
    assert got is not None
    assert (got.x0, got.y0) == pytest.approx((0, 0), abs=1e-9)
    assert (got.x1, got.y1) == pytest.approx((w, h), abs=1e-6)
    whole = box.box_to_source(BoundingBox(0, 0, size, size))
    assert whole is not None  # the padding is clipped away
    assert (whole.x0, whole.y0, whole.x1, whole.y1) == pytest.approx(
        (got.x0, got.y0, got.x1, got.y1)
    )


def test_box_in_padding_is_none() -> None:
    box = Letterbox(100, 50, 100)  # content columns 25..75
    assert box.box_to_source((0, 10, 20, 20)) is None
    assert box.box_to_source((0, 10, 30, 20)) == BoundingBox(0, 10, 5, 20)


@pytest.mark.parametrize(
    ("h", "w", "size", "expected"),
    [
        (1955, 1841, 224, (224, 211, 6, 0)),
        (1000, 3000, 256, (85, 256, 0, 85)),
        (7, 7, 224, (224, 224, 0, 0)),
        (3, 1, 64, (64, 21, 21, 0)),
    ],
)
def test_known_layouts(h: int, w: int, size: int, expected: tuple[int, int, int, int]) -> None:
    box = Letterbox(h, w, size)
    assert (box.new_height, box.new_width, box.offset_x, box.offset_y) == expected


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="positive"):
        Letterbox(0, 10, 224)
    with pytest.raises(ValueError, match="does not match"):
        Letterbox(10, 10, 32).apply(np.zeros((10, 11), np.float32))
