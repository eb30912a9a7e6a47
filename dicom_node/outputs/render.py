"""Pixels for the secondary-capture overlay: the grey display image and what is burnt in.

``render_grey`` is the DICOM grayscale pipeline a viewer applies (PS3.4 N.2): modality
LUT, VOI (window or VOI LUT sequence; a percentile window when the image has neither),
then MONOCHROME1 inversion, so the overlay looks like the source does on a viewer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

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


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> None:
    """Alpha-blend a jet colour map into ``rgb`` (in place) where heat > threshold."""
    rows, cols = rgb.shape[:2]
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    if heat.shape != (rows, cols):
        logger.warning("Heatmap shape %s != image %s; resizing", heat.shape, (rows, cols))
        heat = cv2.resize(heat, (cols, rows), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(heat, 0.0, 1.0)
    mask = heat > HEAT_THRESHOLD
    if not mask.any():
        return
    colour = cv2.applyColorMap((heat[mask] * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    colour = colour.reshape(-1, 3)[:, ::-1].astype(np.float32)  # BGR -> RGB
    base = rgb[mask].astype(np.float32)
    rgb[mask] = np.clip(base * (1.0 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


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


def draw_label(
    rgb: np.ndarray,
    text: str,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    top_limit: int = 0,
) -> None:
    """Label beside the box: above it when there is room, else just inside its top edge."""
    rows, cols = rgb.shape[:2]
    c0, r0, _, _ = box_pixels(box, rows, cols)
    scale, thickness = _font_scale(text, cols * 0.9, base_font_scale(rows, cols))
    (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, th // 4)
    thickness_px = line_thickness(rows, cols)
    gap = thickness_px + pad
    y_base = r0 - gap - baseline
    x = c0
    if y_base - th - pad < top_limit:  # no room above: inside, clear of the outline
        y_base = r0 + gap + th
        x = c0 + thickness_px
    x = min(max(x, 0), max(cols - tw - pad, 0))
    top = max(y_base - th - pad, 0)
    bottom = min(y_base + baseline + pad // 2, rows - 1)
    cv2.rectangle(rgb, (x, top), (min(x + tw + pad, cols - 1), bottom), LABEL_BACKGROUND, -1)
    cv2.putText(rgb, text, (x + pad // 2, y_base), _FONT, scale, colour, thickness, cv2.LINE_AA)


def _banner_lines(lines: Sequence[str], rows: int, cols: int) -> list[tuple]:
    layout = []
    for text in lines:
        scale, thickness = _font_scale(text, cols * 0.96, base_font_scale(rows, cols))
        (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        pad = max(2, th // 3)
        layout.append((text, scale, thickness, tw, th, pad, th + baseline + 2 * pad))
    return layout


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
