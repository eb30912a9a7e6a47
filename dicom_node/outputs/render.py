"""Pixels for the secondary-capture overlay: the grey display image and what is burnt in.

``render_grey`` is the DICOM grayscale pipeline a viewer applies (PS3.4 N.2): modality
LUT, VOI (window or VOI LUT sequence; a percentile window when the image has neither),
then MONOCHROME1 inversion, so the overlay looks like the source does on a viewer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset

from ai.pixels import load_display_image

logger = logging.getLogger(__name__)

HEAT_THRESHOLD = 0.2  # heat below this stays unpainted, so the anatomy stays readable
BANNER_BACKGROUND = (150, 0, 0)
BANNER_TEXT = (255, 255, 255)
LABEL_BACKGROUND = (0, 0, 0)
# Distinct, saturated box colours (RGB) that stand out on grey and on the jet heatmap.
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 128, 0),
    (0, 255, 0),
)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def render_grey(ds: Dataset) -> np.ndarray:
    """8-bit grey display rendering of the source, (rows, columns).

    The model side's :func:`ai.pixels.load_display_image` already implements the
    pipeline (with size checks before decoding); the overlay must show exactly what the
    model saw, so it is reused rather than duplicated.
    """
    unit = load_display_image(ds)
    return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _jet_rgb() -> np.ndarray:
    """OpenCV's jet colour map as a (256, 1, 3) RGB table, for ``cv2.applyColorMap``."""
    levels = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return np.ascontiguousarray(cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1])


_JET_RGB = _jet_rgb()


def heat_levels(heat: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap at ``shape`` as jet levels (uint8, ``heat * 255`` truncated) and the
    mask (uint8 0/1) of the pixels above :data:`HEAT_THRESHOLD`.

    A heatmap at source resolution is resized to the overlay first (the SC may be drawn at
    a reduced display size), so every later pass runs on the smaller frame. NaN counts as
    no heat: ``fmax``/``fmin`` drop it, and before a resize it is patched to 0 (only when
    there is any: ``nan_to_num`` over a 3000 x 2500 map cost 36 ms a job).
    """
    rows, cols = shape
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (rows, cols):
        logger.debug("Heatmap shape %s resized to the overlay's %s", heat.shape, (rows, cols))
        shrinking = heat.shape[0] > rows
        if np.isnan(heat.max()):  # max propagates NaN: one pass finds any (rare: a copy)
            heat = cv2.patchNaNs(np.array(heat, dtype=np.float32, order="C"), 0.0)
        heat = cv2.resize(heat, (cols, rows),
                          interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    heat = np.fmin(np.fmax(heat, 0.0), 1.0)  # a new array: the caller's map is not touched
    mask = (heat > HEAT_THRESHOLD).view(np.uint8)
    np.multiply(heat, 255.0, out=heat)
    return heat.astype(np.uint8), mask


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> None:
    """Alpha-blend a jet colour map into ``rgb`` (in place) where heat > threshold.

    All in uint8 over the whole frame (OpenCV's colour map, weighted sum and masked copy):
    a float RGB frame and a boolean gather/scatter cost seconds on a 3000 x 2500 image.
    Rounding differs from a float blend by at most one level.
    """
    levels, mask = heat_levels(heat, rgb.shape[:2])
    if not cv2.countNonZero(mask):
        return
    colour = cv2.applyColorMap(levels, _JET_RGB)
    blended = cv2.addWeighted(rgb, 1.0 - alpha, colour, alpha, 0.0)
    cv2.copyTo(blended, mask, rgb)


def line_thickness(rows: int, cols: int) -> int:
    return max(1, round(min(rows, cols) / 500))


def box_pixels(
    box: tuple[float, float, float, float], rows: int, cols: int
) -> tuple[int, int, int, int]:
    """Inclusive pixel extent (c0, r0, c1, r1) of a box in continuous pixel coordinates.

    A box edge at x lies in pixel column floor(x); the far edge x1 is exclusive, so its
    pixel is ceil(x1) - 1. ``(0, 0, cols, rows)`` therefore outlines the image border.
    """
    x0, y0, x1, y1 = box
    c0 = min(max(math.floor(x0), 0), cols - 1)
    r0 = min(max(math.floor(y0), 0), rows - 1)
    c1 = min(max(math.ceil(x1) - 1, c0), cols - 1)
    r1 = min(max(math.ceil(y1) - 1, r0), rows - 1)
    return c0, r0, c1, r1


def draw_box(
    rgb: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int]
) -> None:
    """Outline drawn *inside* the box, so its outer pixels are exactly the box edges."""
    rows, cols = rgb.shape[:2]
    c0, r0, c1, r1 = box_pixels(box, rows, cols)
    for i in range(line_thickness(rows, cols)):
        if c0 + i > c1 - i or r0 + i > r1 - i:
            break
        cv2.rectangle(rgb, (c0 + i, r0 + i), (c1 - i, r1 - i), colour, 1, cv2.LINE_8)


def _font_scale(text: str, max_width: float, base: float) -> tuple[float, int]:
    scale = base
    thickness = max(1, round(scale * 1.6))
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    if width > max_width:
        scale = max(0.25, scale * max_width / width)
        thickness = max(1, round(scale * 1.6))
    return scale, thickness


def base_font_scale(rows: int, cols: int) -> float:
    """About 1/60 of the short side in text height: readable on a 2k radiograph."""
    return min(max(min(rows, cols) / 1100.0, 0.35), 4.0)


MIN_FONT_SCALE = 0.3  # about 7 px of text: the smallest label still legible on a monitor
_SHRINK = 0.8


@dataclass(frozen=True)
class PlacedLabel:
    """Where one label goes: its filled rectangle (left, top, right, bottom; right and
    bottom exclusive) and how its text is drawn inside it."""

    text: str
    rect: tuple[int, int, int, int]
    scale: float
    thickness: int
    baseline: int  # y of the text baseline (cv2.putText origin)
    pad: int


def layout_labels(
    texts: Sequence[str],
    boxes: Sequence[tuple[float, float, float, float]],
    rows: int,
    cols: int,
    top_limit: int = 0,
) -> list[PlacedLabel | None]:
    """Place one label per box so that no two labels overlap and every label lies inside
    the image, below ``top_limit`` (the banners).

    Greedy, in the given order: around the box (above, below, inside its top edge, right,
    left), then stacked further up or down; positions clear of the other boxes first, then
    any free one; then the same with a smaller font, down to :data:`MIN_FONT_SCALE`; last,
    the free spot nearest the box. ``None`` when the image has no room left (the caller
    names such a finding elsewhere, e.g. in the summary line).
    """
    extents = [box_pixels(box, rows, cols) for box in boxes]
    placed: list[PlacedLabel] = []
    result: list[PlacedLabel | None] = []
    for index, text in enumerate(texts):
        others = [e for k, e in enumerate(extents) if k != index]
        label = _place(text, extents[index], others, placed, rows, cols, top_limit)
        if label is not None:
            placed.append(label)
        result.append(label)
    return result


def _place(
    text: str,
    extent: tuple[int, int, int, int],
    other_boxes: Sequence[tuple[int, int, int, int]],
    placed: Sequence[PlacedLabel],
    rows: int,
    cols: int,
    top_limit: int,
) -> PlacedLabel | None:
    taken = [label.rect for label in placed]
    scale, _ = _font_scale(text, cols * 0.9, base_font_scale(rows, cols))
    bounds = (0, top_limit, cols, rows)
    while True:
        size = _label_size(text, scale)
        candidates = list(_around(extent, size[0], size[1], line_thickness(rows, cols), rows))
        for avoid_boxes in (True, False):
            blocked = taken + [_outline(b) for b in other_boxes] if avoid_boxes else taken
            for rect in candidates:
                if _inside(rect, bounds) and not any(_overlap(rect, b) for b in blocked):
                    return _label(text, rect, scale)
        if scale <= MIN_FONT_SCALE:
            break
        scale = max(scale * _SHRINK, MIN_FONT_SCALE)
    rect = _nearest_free(extent, _label_size(text, scale), taken, bounds)
    return None if rect is None else _label(text, rect, scale)


def _label_size(text: str, scale: float) -> tuple[int, int]:
    thickness = max(1, round(scale * 1.6))
    (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, th // 4)
    return tw + 2 * pad, th + baseline + 2 * pad


def _label(text: str, rect: tuple[int, int, int, int], scale: float) -> PlacedLabel:
    thickness = max(1, round(scale * 1.6))
    (_, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, th // 4)
    return PlacedLabel(text, rect, scale, thickness, rect[1] + pad + th, pad)


def _around(
    extent: tuple[int, int, int, int], width: int, height: int, thickness: int, rows: int
):  # noqa: ANN202 - generator of rectangles
    """Candidate rectangles near a box, best first."""
    c0, r0, c1, r1 = extent
    gap = thickness + 1
    above, below = r0 - gap - height, r1 + 1 + gap
    lefts = (c0, c1 + 1 - width)  # aligned with the box's left edge, else its right edge
    for top in (above, below):
        for left in lefts:
            yield left, top, left + width, top + height
    inside = (c0 + thickness + 1, r0 + thickness + 1)
    yield inside[0], inside[1], inside[0] + width, inside[1] + height
    for left in (c1 + 1 + gap, c0 - gap - width):  # right, then left of the box
        yield left, r0, left + width, r0 + height
    step = height + 1
    for k in range(1, rows // step + 1):  # stacked: further up, further down
        for top in (above - k * step, below + k * step):
            for left in lefts:
                yield left, top, left + width, top + height


def _nearest_free(
    extent: tuple[int, int, int, int],
    size: tuple[int, int],
    taken: Sequence[tuple[int, int, int, int]],
    bounds: tuple[int, int, int, int],
) -> tuple[int, int, int, int] | None:
    """The free spot (on a grid of half a label) nearest the box, anywhere in bounds."""
    width, height = size
    x_step, y_step = max(width // 4, 1), max(height // 2, 1)
    cx, cy = (extent[0] + extent[2]) / 2.0, (extent[1] + extent[3]) / 2.0
    spots = [
        (x, y, x + width, y + height)
        for y in range(bounds[1], bounds[3] - height + 1, y_step)
        for x in range(bounds[0], bounds[2] - width + 1, x_step)
    ]
    spots.sort(key=lambda r: (r[0] + width / 2 - cx) ** 2 + (r[1] + height / 2 - cy) ** 2)
    for rect in spots:
        if not any(_overlap(rect, t) for t in taken):
            return rect
    return None


def _outline(extent: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    c0, r0, c1, r1 = extent
    return c0, r0, c1 + 1, r1 + 1


def _inside(rect: tuple[int, int, int, int], bounds: tuple[int, int, int, int]) -> bool:
    return rect[0] >= bounds[0] and rect[1] >= bounds[1] and rect[2] <= bounds[2] and (
        rect[3] <= bounds[3]
    )


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Rectangles with exclusive right/bottom edges share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_label(rgb: np.ndarray, label: PlacedLabel, colour: tuple[int, int, int]) -> None:
    """Filled label background and its text, all inside ``label.rect``."""
    left, top, right, bottom = label.rect
    cv2.rectangle(rgb, (left, top), (right - 1, bottom - 1), LABEL_BACKGROUND, -1)
    # putText may anti-alias a pixel past the metrics: draw into the label's own pixels
    patch = rgb[top:bottom, left:right]
    cv2.putText(
        patch,
        label.text,
        (label.pad, label.baseline - top),
        _FONT,
        label.scale,
        colour,
        label.thickness,
        cv2.LINE_AA,
    )


def _banner_lines(lines: Sequence[str], rows: int, cols: int) -> list[tuple]:
    layout = []
    for text in lines:
        scale, thickness = _font_scale(text, cols * 0.96, base_font_scale(rows, cols))
        (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        pad = max(2, th // 3)
        layout.append((text, scale, thickness, tw, th, pad, th + baseline + 2 * pad))
    return layout


def banner_fits(text: str, rows: int, cols: int) -> bool:
    """Whether :func:`draw_banner` writes ``text`` at its full size (not shrunk to fit)."""
    base = base_font_scale(rows, cols)
    return _font_scale(text, cols * 0.96, base)[0] == base


def banner_height(lines: Sequence[str], rows: int, cols: int) -> int:
    """Height in pixels of the bar :func:`draw_banner` draws."""
    return sum(entry[-1] for entry in _banner_lines(lines, rows, cols))


def draw_banner(
    rgb: np.ndarray,
    lines: Sequence[str],
    top: int = 0,
    background: tuple[int, int, int] = BANNER_BACKGROUND,
    colour: tuple[int, int, int] = BANNER_TEXT,
) -> int:
    """Filled full-width bar from ``top`` with one centred text line each; returns its bottom."""
    rows, cols = rgb.shape[:2]
    y = top
    for text, scale, thickness, tw, th, pad, height in _banner_lines(lines, rows, cols):
        if y >= rows:
            break
        cv2.rectangle(rgb, (0, y), (cols - 1, min(y + height, rows) - 1), background, -1)
        x = max((cols - tw) // 2, 0)
        cv2.putText(rgb, text, (x, y + pad + th), _FONT, scale, colour, thickness, cv2.LINE_AA)
        y += height
    return y
