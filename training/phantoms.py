"""Procedural chest-radiograph phantoms with findings a model can genuinely learn.

The renderer builds an *attenuation* map from anatomical layers (body, lungs,
heart and mediastinum, spine, ribs, clavicles, diaphragm, vessels) and maps it
to a display intensity in ``[0, 1]`` where bright means attenuating (the
MONOCHROME2 sense).  Anatomy is laid out in "thorax units" (1.0 = inner
thoracic width) so that non-square images are not distorted, and physical
sizes (a nodule's diameter in mm) follow the pixel spacing.

Everything is drawn at a working resolution (at most :data:`MAX_WORK_SIDE`
pixels on the long side) and resized, so a 3000 x 3000 image costs little more
than a 768 x 768 one; only the quantum noise is generated at full resolution.
All randomness comes from one :class:`numpy.random.Generator`, so a seed
fully determines the image, its findings and their boxes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from training.errors import TrainingError

logger = logging.getLogger(__name__)

FINDINGS: tuple[str, ...] = (
    "nodule",
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
)
"""Finding labels, in the order used for class indices everywhere."""

VIEWS: tuple[str, ...] = ("PA", "AP", "LL")
MAX_WORK_SIDE = 768
NORMAL_CTR = (0.38, 0.48)
ENLARGED_CTR = (0.57, 0.68)
_SIDES = (-1, 1)  # -1: image left (patient's right in PA), +1: image right

Seed = int | np.random.Generator | np.random.SeedSequence


class PhantomError(TrainingError, ValueError):
    """Raised for impossible phantom requests (bad size, unknown view or finding)."""


@dataclass(frozen=True)
class Box:
    """A finding's bounding box in normalised image coordinates (0..1)."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def class_index(self) -> int:
        return FINDINGS.index(self.label)

    def yolo(self) -> str:
        """YOLO line ``"<class> xc yc w h"``, all normalised."""
        xc, yc = (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2
        w, h = self.x1 - self.x0, self.y1 - self.y0
        return f"{self.class_index} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}"

    def to_pixels(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        """``(col0, row0, col1, row1)`` pixel bounds, end-exclusive."""
        c0, r0 = int(math.floor(self.x0 * columns)), int(math.floor(self.y0 * rows))
        c1, r1 = int(math.ceil(self.x1 * columns)), int(math.ceil(self.y1 * rows))
        return max(c0, 0), max(r0, 0), min(c1, columns), min(r1, rows)


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: the image plus the ground truth that produced it."""

    image: np.ndarray  # float32 (rows, columns) in [0, 1], bright = attenuating
    view: str
    findings: dict[str, bool]
    boxes: tuple[Box, ...]
    pixel_spacing_mm: float
    cardiothoracic_ratio: float
    # bool (rows, columns): the lung fields as drawn (frontal views; None for a lateral),
    # the reference for "how much of a heatmap lies in the lungs"
    lungs: np.ndarray | None = None

    def labels(self) -> list[int]:
        return [int(self.findings[name]) for name in FINDINGS]


@dataclass(frozen=True)
class _Canvas:
    """Working-resolution canvas and the mapping from thorax units to pixels."""

    h: int
    w: int
    cx: float
    top: float
    scale: float  # working pixels per thorax unit

    def px(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64)
        return np.stack(
            [self.cx + pts[..., 0] * self.scale, self.top + pts[..., 1] * self.scale], -1
        )

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        xs = (np.arange(self.w, dtype=np.float32) - self.cx) / self.scale
        ys = (np.arange(self.h, dtype=np.float32) - self.top) / self.scale
        return xs[None, :], ys[:, None]

    def box(self, label: str, mask: np.ndarray, threshold: float = 0.3) -> Box | None:
        """Normalised bounding box of ``mask > threshold`` (None when empty)."""
        rows = np.flatnonzero((mask > threshold).any(axis=1))
        cols = np.flatnonzero((mask > threshold).any(axis=0))
        if rows.size == 0:
            return None
        return Box(
            label,
            float(cols[0] / self.w),
            float(rows[0] / self.h),
            float((cols[-1] + 1) / self.w),
            float((rows[-1] + 1) / self.h),
        )


@dataclass
class _Anatomy:
    """Random anatomical parameters, in thorax units."""

    lat: dict[int, float]  # lateral lung border |x| per side
    dome: dict[int, float]  # dome top y per side
    cp: dict[int, float]  # costophrenic angle y per side
    ctr: float
    heart_h: float
    heart_x: float
    mediastinum: float
    rib_dy: float
    rib_y0: float
    body_w: float
    k: float  # attenuation-to-intensity gain


# --------------------------------------------------------------------------- helpers


def _smooth_closed(points: np.ndarray, per_segment: int = 10) -> np.ndarray:
    """Closed Catmull-Rom spline through ``points`` (n, 2)."""
    p = np.asarray(points, dtype=np.float64)
    p0, p1, p2, p3 = np.roll(p, 1, 0), p, np.roll(p, -1, 0), np.roll(p, -2, 0)
    t = np.linspace(0, 1, per_segment, endpoint=False)[None, :, None]
    a = 2 * p1[:, None]
    b = (p2 - p0)[:, None] * t
    c = (2 * p0 - 5 * p1 + 4 * p2 - p3)[:, None] * t**2
    d = (-p0 + 3 * p1 - 3 * p2 + p3)[:, None] * t**3
    return (0.5 * (a + b + c + d)).reshape(-1, 2)


def _bezier(p0: tuple, p1: tuple, p2: tuple, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    a, b, c = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


def _fill(canvas: _Canvas, pts: np.ndarray) -> np.ndarray:
    """Filled polygon (thorax units) as a uint8 0/1 mask."""
    mask = np.zeros((canvas.h, canvas.w), np.uint8)
    poly = np.round(canvas.px(pts) * 16).astype(np.int32)
    cv2.fillPoly(mask, [poly], 1, cv2.LINE_AA, shift=4)
    return (mask > 0).astype(np.uint8)


def _stroke(
    layer: np.ndarray, canvas: _Canvas, pts: np.ndarray, width: float, value: float
) -> None:
    """Draw a polyline (thorax units) of ``width`` thorax units into ``layer``."""
    _polyline(layer, canvas, np.round(canvas.px(pts) * 16).astype(np.int32), width, value)


def _polyline(
    layer: np.ndarray, canvas: _Canvas, poly: np.ndarray, width: float, value: float
) -> None:
    """Draw ``poly`` (int32 pixels in 1/16 px, as cv2's ``shift=4`` reads them), ``width``
    thorax units wide, anti-aliased."""
    thick = max(int(round(width * canvas.scale)), 1)
    cv2.polylines(layer, [poly], False, float(value), thick, cv2.LINE_AA, shift=4)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.3:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _pick(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int] | None:
    """A uniformly random (row, col) where ``mask`` is true."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    flat = int(idx[rng.integers(idx.size)])
    return divmod(flat, mask.shape[1])


def _dome_y(x: np.ndarray, an: _Anatomy, side: int) -> np.ndarray:
    """Diaphragm dome height at ``x`` for one side: a parabola to the CP angle."""
    apex_x, lat = 0.22, an.lat[side]
    u = np.clip((np.abs(x) - apex_x) / (lat - apex_x), -1.5, 1.2)
    return an.dome[side] + (an.cp[side] - an.dome[side]) * u**2


# --------------------------------------------------------------------------- anatomy


def _anatomy(rng: np.random.Generator, cardiomegaly: bool) -> _Anatomy:
    lo, hi = ENLARGED_CTR if cardiomegaly else NORMAL_CTR
    dome_r = rng.uniform(0.70, 0.78)
    return _Anatomy(
        lat={-1: rng.uniform(0.47, 0.51), 1: rng.uniform(0.47, 0.51)},
        dome={-1: dome_r, 1: dome_r + rng.uniform(0.01, 0.06)},
        cp={-1: dome_r + rng.uniform(0.15, 0.20), 1: dome_r + rng.uniform(0.17, 0.22)},
        ctr=float(rng.uniform(lo, hi)),
        heart_h=rng.uniform(0.27, 0.32),
        heart_x=rng.uniform(0.08, 0.16),
        mediastinum=rng.uniform(0.06, 0.08),
        rib_dy=rng.uniform(0.08, 0.09),
        rib_y0=rng.uniform(0.0, 0.03),
        body_w=rng.uniform(0.56, 0.66),
        k=rng.uniform(0.75, 0.95),
    )


def _lung_mask(canvas: _Canvas, an: _Anatomy, side: int, rng: np.random.Generator) -> np.ndarray:
    s, lat = side, an.lat[side]
    med = 0.09 if side < 0 else 0.11
    dome_x = np.linspace(lat - 0.03, med + 0.02, 6)
    dome = [(s * x, float(_dome_y(np.array(x), an, side))) for x in dome_x]
    pts = [
        (s * 0.17, 0.0),
        (s * 0.29, 0.03),
        (s * 0.39, 0.13),
        (s * (lat - 0.02), 0.32),
        (s * lat, 0.55),
        (s * lat, an.cp[side] - 0.08),
        *dome,
        (s * med, 0.62),
        (s * (med + 0.01), 0.45),
        (s * (med - 0.02), 0.26),
        (s * 0.08, 0.07),
    ]
    jitter = rng.normal(0.0, 0.006, (len(pts), 2))
    return _fill(canvas, _smooth_closed(np.asarray(pts) + jitter, 8))


def _body(canvas: _Canvas, an: _Anatomy) -> np.ndarray:
    bw = an.body_w
    half = [
        (0.11, -0.9),
        (0.12, -0.2),
        (0.30, -0.15),
        (bw + 0.02, -0.08),
        (bw + 0.08, 0.05),
        (bw + 0.01, 0.30),
        (bw - 0.03, 0.75),
        (bw - 0.04, 1.10),
        (bw - 0.02, 2.5),
    ]
    right = [(x, y) for x, y in half]
    left = [(-x, y) for x, y in reversed(half)]
    body = _fill(canvas, np.asarray(right + left)).astype(np.float32)
    arms = np.zeros_like(body)
    for s in _SIDES:  # upper arms at the image edges
        _stroke(
            arms, canvas, np.array([(s * (bw + 0.17), -0.1), (s * (bw + 0.22), 1.2)]), 0.16, 1.0
        )
    return np.maximum(body, 0.8 * arms)


def _heart(canvas: _Canvas, an: _Anatomy) -> tuple[np.ndarray, tuple[float, ...]]:
    """Heart silhouette (soft mask) and its (x0, y0, x1, y1) in thorax units."""
    thoracic = an.lat[-1] + an.lat[1]
    a = an.ctr * thoracic / 2
    xc = -0.38 * 2 * a + a + (an.heart_x - 0.12) * 0.2
    b = an.heart_h / 2 * (1 + 0.8 * (an.ctr - 0.43))
    bottom = max(an.dome.values()) + 0.09
    yc = bottom - 0.8 * b
    x, y = canvas.grid()
    r = ((x - xc) / a) ** 2 + ((y - yc) / b) ** 2
    mask = np.clip((1.0 - r) * a * canvas.scale / 2.5, 0, 1) * (
        0.8 + 0.2 * np.sqrt(np.clip(1.0 - r, 0, 1))
    )
    return mask.astype(np.float32), (xc - a, yc - b, xc + a, min(yc + b, bottom))


def _mediastinum(canvas: _Canvas, an: _Anatomy, heart_top: float) -> np.ndarray:
    x, y = canvas.grid()
    width = an.mediastinum + 0.02 * np.clip((y - 0.1) / 0.3, 0, 1)
    band = np.clip((width - np.abs(x - 0.01)) * canvas.scale / 2, 0, 1) * (y < heart_top + 0.1)
    knob = np.clip(
        (0.05 - np.hypot(x - an.mediastinum - 0.03, y - heart_top + 0.02)) * canvas.scale / 2, 0, 1
    )
    return np.maximum(band, knob).astype(np.float32)


def _spine(canvas: _Canvas, an: _Anatomy) -> np.ndarray:
    x, y = canvas.grid()
    col = np.clip((0.045 - np.abs(x)) * canvas.scale / 1.5, 0, 1)
    phase = (y - an.rib_y0) / an.rib_dy
    discs = 1.0 - 0.45 * np.cos(np.pi * phase) ** 16
    pedicles = np.clip((0.01 - np.abs(np.abs(x) - 0.035)) * canvas.scale, 0, 1) * 0.4
    return (col * discs + pedicles * discs).astype(np.float32)


def _ribs(canvas: _Canvas, an: _Anatomy) -> np.ndarray:
    layer = np.zeros((canvas.h, canvas.w), np.float32)
    inner = np.zeros_like(layer)
    for i in range(11):
        y0 = an.rib_y0 + i * an.rib_dy
        for s in _SIDES:
            lat = an.lat[s] + 0.015
            post = _bezier((s * 0.04, y0), (s * 0.28, y0 - 0.07), (s * lat, y0 + 0.10))
            ant = _bezier(
                (s * lat, y0 + 0.10), (s * (lat - 0.03), y0 + 0.24), (s * 0.17, y0 + 0.31)
            )
            width = 0.026 + 0.002 * i
            _stroke(layer, canvas, post, width, 1.0)
            _stroke(inner, canvas, post, width * 0.45, 0.4)
            _stroke(layer, canvas, ant, width * 1.1, 0.3)
    for s in _SIDES:  # clavicles, bright and thick
        clav = _bezier((s * 0.06, -0.03), (s * 0.22, 0.03), (s * 0.47, -0.08))
        _stroke(layer, canvas, clav, 0.035, 1.3)
    return np.clip(layer - inner, 0, None)


def _vessels(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Branching vascular markings radiating from both hila."""
    layer = np.zeros((canvas.h, canvas.w), np.float32)
    for s in _SIDES:
        hilum = np.array([s * 0.13, 0.45])
        for base in (-100, -65, -30, 5, 40, 75):
            ang = math.radians(base if s > 0 else 180 - base) + rng.normal(0, 0.12)
            _branch(layer, canvas, rng, hilum, ang, rng.uniform(0.08, 0.12), 0.016, 4)
        cv2.circle(
            layer,
            tuple(int(v) for v in canvas.px(hilum)),
            max(int(0.035 * canvas.scale), 1),
            1.0,
            -1,
        )
    return _blur(layer, 0.8)


def _branch(
    layer: np.ndarray,
    canvas: _Canvas,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    width: float,
    depth: int,
) -> None:
    """A vessel-like tree of ``2**(depth + 1) - 1`` strokes from ``start`` (thorax units)."""
    _branch_from(layer, canvas, rng, float(start[0]), float(start[1]), angle, length, width,
                 depth)


def _branch_from(
    layer: np.ndarray,
    canvas: _Canvas,
    rng: np.random.Generator,
    x: float,
    y: float,
    angle: float,
    length: float,
    width: float,
    depth: int,
) -> None:
    """:func:`_branch` in plain floats: the same arithmetic as :meth:`_Canvas.px` and
    :func:`_stroke` (IEEE doubles, round half to even), so the same pixels, without the
    handful of small numpy arrays per stroke that made vessels a third of a phantom's time
    (hundreds of strokes each)."""
    end_x = x + length * math.cos(angle)
    end_y = y + length * math.sin(angle)
    thick_px = width * canvas.scale
    cx, top, scale = canvas.cx, canvas.top, canvas.scale
    poly = np.array(
        (
            (round((cx + x * scale) * 16), round((top + y * scale) * 16)),
            (round((cx + end_x * scale) * 16), round((top + end_y * scale) * 16)),
        ),
        np.int32,
    )
    _polyline(layer, canvas, poly, width, min(1.0, 0.15 + thick_px / 3))
    if depth == 0:
        return
    for sign in (-1, 1):
        child = angle + sign * math.radians(rng.uniform(12, 32))
        _branch_from(
            layer,
            canvas,
            rng,
            end_x,
            end_y,
            child,
            length * rng.uniform(0.65, 0.85),
            width * 0.72,
            depth - 1,
        )


def _texture(rng: np.random.Generator, canvas: _Canvas, cell: int) -> np.ndarray:
    small = rng.standard_normal((max(canvas.h // cell, 2), max(canvas.w // cell, 2))).astype(
        np.float32
    )
    return cv2.resize(small, (canvas.w, canvas.h), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- findings


@dataclass
class _Scene:
    """State shared by the finding renderers (all at working resolution)."""

    canvas: _Canvas
    anatomy: _Anatomy
    lungs: dict[int, np.ndarray]  # uint8 0/1 per side
    heart: np.ndarray
    extra: np.ndarray  # attenuation added (or removed) by findings
    vessel_keep: np.ndarray  # 1 where vascular markings stay visible
    free: np.ndarray  # bool: lung not yet used by a finding nor hidden by the heart
    mm_per_px: float

    def mm(self, value: float) -> float:
        """Millimetres to working pixels."""
        return value / self.mm_per_px


def _nodule(scene: _Scene, rng: np.random.Generator) -> Box | None:
    c = scene.canvas
    radius = scene.mm(rng.uniform(8.0, 30.0)) / 2
    inner = cv2.distanceTransform(scene.free.astype(np.uint8), cv2.DIST_L2, 5)
    spot = _pick(rng, inner > radius * 1.1 + 1)
    if spot is None:
        spot = _pick(rng, inner >= inner.max() * 0.8)
    if spot is None:
        return None
    r0, c0 = spot
    yy, xx = np.ogrid[: c.h, : c.w]
    ang = np.arctan2(yy - r0, xx - c0)
    lobes = (
        1
        + 0.08 * np.sin(3 * ang + rng.uniform(0, 6.3))
        + 0.05 * np.sin(5 * ang + rng.uniform(0, 6.3))
    )
    dist = np.hypot(yy - r0, xx - c0) / (radius * lobes)
    disc = np.clip((1.0 - dist) * radius / 1.5, 0, 1) * (
        0.75 + 0.25 * np.sqrt(np.clip(1 - dist**2, 0, 1))
    )
    scene.extra += rng.uniform(0.55, 0.8) * disc.astype(np.float32)
    scene.free &= disc < 0.05
    return c.box("nodule", disc, 0.2)


def _effusion(scene: _Scene, rng: np.random.Generator) -> Box | None:
    c, an = scene.canvas, scene.anatomy
    side = int(rng.choice(_SIDES))
    x, y = c.grid()
    level = an.dome[side] - rng.uniform(-0.04, 0.22)
    lateral = np.clip((np.abs(x) - 0.1) / (an.lat[side] - 0.1), 0, 1)
    meniscus = level - rng.uniform(0.04, 0.12) * lateral**2
    fluid = _blur((scene.lungs[side] & (y > meniscus)).astype(np.float32), 1.5)
    fluid = np.clip(fluid * 1.4, 0, 1) * scene.lungs[side]
    if fluid.sum() < 20:
        return None
    # fluid is soft-tissue dense: it cancels the air lucency and hides vessels
    scene.extra += 1.0 * fluid * (0.85 + 0.15 * np.clip(y - meniscus, 0, 0.2) / 0.2)
    scene.vessel_keep *= 1 - fluid
    scene.free &= fluid < 0.05
    return c.box("pleural_effusion", fluid, 0.3)


def _pneumothorax(scene: _Scene, rng: np.random.Generator) -> Box | None:
    c, an = scene.canvas, scene.anatomy
    side = int(rng.choice(_SIDES))
    lung = scene.lungs[side]
    # collapse the lung towards its medial base: the rim opens at apex and side
    anchor = c.px(np.array([side * 0.12, an.dome[side] + 0.06]))
    scale = rng.uniform(0.72, 0.9)
    m = np.array([[scale, 0, (1 - scale) * anchor[0]], [0, scale, (1 - scale) * anchor[1]]])
    collapsed = cv2.warpAffine(lung, m, (c.w, c.h), flags=cv2.INTER_NEAREST) & lung
    rim = (lung & (1 - collapsed)).astype(np.float32)
    if rim.sum() < 20:
        return None
    edge = collapsed - cv2.erode(collapsed, np.ones((3, 3), np.uint8))
    near_rim = cv2.dilate(rim, np.ones((5, 5), np.uint8)) > 0
    line = _blur((edge * near_rim).astype(np.float32), 0.7)
    scene.extra += 0.35 * line - 0.18 * _blur(rim, 1.0)
    scene.vessel_keep *= 1 - _blur(rim, 1.0)
    scene.free &= ~cv2.dilate(rim, np.ones((9, 9), np.uint8)).astype(bool)
    return c.box("pneumothorax", rim, 0.5)


def _consolidation(scene: _Scene, rng: np.random.Generator) -> Box | None:
    c = scene.canvas
    size = rng.uniform(0.07, 0.13) * c.scale
    inner = cv2.distanceTransform(scene.free.astype(np.uint8), cv2.DIST_L2, 5)
    spot = _pick(rng, inner > size * 0.4)
    if spot is None:
        return None
    layer = np.zeros((c.h, c.w), np.float32)
    for _ in range(int(rng.integers(6, 15))):
        dr, dc = rng.normal(0, size * 0.5, 2)
        center = (int(spot[1] + dc), int(spot[0] + dr))
        cv2.circle(layer, center, max(int(size * rng.uniform(0.25, 0.55)), 1), 1.0, -1)
    layer = _blur(layer, size * 0.25) * (1 + 0.35 * _texture(rng, c, 6))
    patch = np.clip(layer * 1.6 - 0.2, 0, 1) * _blur(scene.free.astype(np.float32), 1.0)
    if patch.max() < 0.3:
        return None
    if rng.random() < 0.5:  # air bronchogram: dark branching tubes inside the opacity
        tubes = np.zeros_like(layer)
        start = np.array([(spot[1] - c.cx) / c.scale, (spot[0] - c.top) / c.scale])
        _branch(tubes, c, rng, start, rng.uniform(0, 2 * np.pi), size / c.scale * 0.6, 0.012, 2)
        patch = patch - 0.45 * _blur(tubes, 0.6) * patch
    # airspace filled with fluid approaches soft-tissue density (the effusion renderer uses
    # 1.0): 0.6 left a blotchy patch fainter than the rib shadows at 224 px, which no model
    # of the demo build learned (held-out AUROC 0.73)
    scene.extra += rng.uniform(0.8, 0.95) * patch
    scene.vessel_keep *= 1 - 0.85 * np.clip(patch, 0, 1)
    scene.free &= patch < 0.05
    return c.box("consolidation", patch, 0.3)


_RENDERERS: dict[str, Callable[[_Scene, np.random.Generator], Box | None]] = {
    "pleural_effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "consolidation": _consolidation,
    "nodule": _nodule,
}


# --------------------------------------------------------------------------- composition


def _frontal(
    c: _Canvas,
    geom: np.random.Generator,
    frng: np.random.Generator,
    findings: dict[str, bool],
    mm_px: float,
) -> tuple[np.ndarray, list[Box], float, np.ndarray]:
    """Attenuation map of a PA/AP chest, the finding boxes, the CTR and the lung mask."""
    an = _anatomy(geom, findings["cardiomegaly"])
    x, y = c.grid()
    body = _body(c, an)
    lungs = {s: _lung_mask(c, an, s, geom) for s in _SIDES}
    lung = _blur((lungs[-1] | lungs[1]).astype(np.float32), 1.2)
    heart, hbox = _heart(c, an)
    dome = np.where(x < 0, _dome_y(x, an, -1), _dome_y(x, an, 1))
    abdomen = np.clip((y - dome) * c.scale / 3, 0, 1) * body
    cage = np.clip((max(an.lat.values()) + 0.04 - np.abs(x)) * c.scale / 4, 0, 1) * np.clip(
        (max(an.cp.values()) + 0.16 - y) * 6, 0, 1
    )
    vessels = _vessels(c, geom)
    texture = _texture(geom, c, 5)
    trachea = np.clip((0.022 - np.abs(x)) * c.scale / 1.5, 0, 1) * (y < 0.3) * (y > -0.6)
    scene = _Scene(
        c,
        an,
        lungs,
        heart,
        np.zeros_like(lung),
        np.ones_like(lung),
        (lung > 0.5) & (heart < 0.05),
        mm_px,
    )
    boxes: list[Box] = []
    if findings["cardiomegaly"]:
        p0, p1 = c.px(np.array(hbox[:2])), c.px(np.array(hbox[2:]))
        x0, y0, x1, y1 = (float(v) for v in (p0[0] / c.w, p0[1] / c.h, p1[0] / c.w, p1[1] / c.h))
        boxes.append(Box("cardiomegaly", x0, y0, x1, y1))
    for name, renderer in _RENDERERS.items():
        if findings[name]:
            box = renderer(scene, frng)
            if box is None:  # no room left; keep labels truthful
                logger.debug("finding %s could not be placed", name)
                findings[name] = False
            else:
                boxes.append(box)
    att = (
        1.25 * body
        + 0.35 * abdomen
        - 0.95 * lung * (1 - 0.7 * heart)
        + 0.6 * heart
        + 0.55 * _mediastinum(c, an, hbox[1]) * (1 - heart)
        - 0.3 * trachea
        + 0.3 * _spine(c, an) * body * (1 - 0.5 * heart)
        + 0.3 * _ribs(c, an) * cage * body
        + 0.16 * vessels * lung * scene.vessel_keep
        + 0.045 * texture * lung
        + scene.extra
    )
    if geom.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
        bubble = ((x - 0.25) / 0.07) ** 2 + ((y - an.dome[1] - 0.09) / 0.035) ** 2 < 1
        att -= 0.4 * _blur(bubble.astype(np.float32), 1.5)
    return att, boxes, an.ctr, (lungs[-1] | lungs[1]).astype(bool)


def _lateral(c: _Canvas, geom: np.random.Generator) -> np.ndarray:
    """Attenuation map of a left-lateral chest: anterior on the image left."""
    an = _anatomy(geom, False)
    x, y = c.grid()
    dome = an.dome[-1] + 0.05 + 0.12 * (x / 0.35) ** 2
    outline = [
        (-0.15, -0.9),
        (-0.2, -0.25),
        (-0.42, 0.05),
        (-0.45, 0.5),
        (-0.48, 1.0),
        (-0.47, 2.5),
        (0.44, 2.5),
        (0.44, 1.0),
        (0.46, 0.4),
        (0.42, 0.0),
        (0.2, -0.25),
        (0.15, -0.9),
    ]
    body = _blur(_fill(c, np.asarray(outline)).astype(np.float32), 1.5)
    field = [
        (0.0, -0.02),
        (-0.22, 0.06),
        (-0.33, 0.3),
        (-0.33, 0.6),
        (-0.3, an.dome[-1] + 0.12),
        (-0.1, an.dome[-1] + 0.06),
        (0.1, an.dome[-1] + 0.08),
        (0.3, an.cp[-1] + 0.08),
        (0.34, 0.55),
        (0.3, 0.2),
        (0.14, 0.01),
    ]
    lung = _blur(
        _fill(c, _smooth_closed(np.asarray(field) + geom.normal(0, 0.006, (11, 2)), 8)), 1.5
    )
    lung = lung.astype(np.float32) * (y < dome + 0.02)
    heart = (
        np.clip(1 - ((x + 0.13) / 0.2) ** 2 - ((y - an.dome[-1] + 0.04) / 0.17) ** 2, 0, 1) ** 0.3
    )
    phase = (y - an.rib_y0) / an.rib_dy
    spine = np.clip((0.06 - np.abs(x - 0.3)) * c.scale / 1.5, 0, 1) * (
        1 - 0.45 * np.cos(np.pi * phase) ** 16
    )
    sternum = np.clip((0.012 - np.abs(x + 0.37)) * c.scale, 0, 1) * (y > 0.04) * (y < 0.6)
    vessels = np.zeros_like(lung)
    for base in (-120, -60, 0, 60, 120, 180):
        ang = math.radians(base) + geom.normal(0, 0.2)
        _branch(vessels, c, geom, np.array([0.03, 0.42]), ang, geom.uniform(0.06, 0.1), 0.014, 3)
    abdomen = np.clip((y - dome) * c.scale / 3, 0, 1)
    att = (
        1.5 * body
        + 0.3 * abdomen * body
        - 0.85 * lung * (1 - 0.6 * heart)
        + 0.7 * heart
        + 0.5 * spine
        + 0.4 * sternum
        + 0.2 * _blur(vessels, 0.8) * lung
        + 0.5 * body * np.clip((0.15 - y) * 6, 0, 1)
        + 0.04 * _texture(geom, c, 5) * lung
    )
    return att.astype(np.float32)


def _canvas(
    geom: np.random.Generator, rows: int, columns: int, spacing: float, view: str
) -> tuple[_Canvas, float]:
    """Working canvas for the requested size, and its mm per working pixel."""
    f = min(1.0, MAX_WORK_SIDE / max(rows, columns))
    h, w = max(int(round(rows * f)), 16), max(int(round(columns * f)), 16)
    mm_px = spacing * columns / w
    fov_w, fov_h = columns * spacing, rows * spacing
    width = min(geom.uniform(270.0, 320.0), 0.86 * fov_w, 0.8 * fov_h)
    if view == "LL":
        width = min(width, 0.95 * fov_w)
    top = min(geom.uniform(0.08, 0.14) * fov_h, 0.97 * fov_h - width)
    cx = w / 2 + geom.normal(0, 0.012) * w
    return _Canvas(h, w, cx, max(top, 0.02 * fov_h) / mm_px, width / mm_px), mm_px


def _finish(
    att: np.ndarray,
    c: _Canvas,
    k: float,
    rows: int,
    columns: int,
    noise: np.random.Generator,
    view: str,
) -> np.ndarray:
    """Attenuation -> intensity, exposure gradient, marker, resize and quantum noise."""
    img = 1.0 - np.exp(-k * np.clip(att, 0, None))
    gx, gy = noise.uniform(-0.08, 0.08, 2)
    yy, xx = np.ogrid[: c.h, : c.w]
    img = img * (1 + gx * (xx / c.w - 0.5) + gy * (yy / c.h - 0.5)) + noise.uniform(0, 0.03)
    if noise.random() < 0.5:
        letter = "L" if view == "LL" else "R"
        size = max(c.w / 600, 0.4)
        org = (int(c.w * 0.04), int(c.h * 0.06))
        mark = np.zeros((c.h, c.w), np.uint8)
        cv2.putText(
            mark,
            letter,
            org,
            cv2.FONT_HERSHEY_SIMPLEX,
            size,
            255,
            max(int(size * 2), 1),
            cv2.LINE_AA,
        )
        img = np.maximum(img, mark * (0.95 / 255))
    img = img.astype(np.float32)
    if img.shape != (rows, columns):
        img = cv2.resize(img, (columns, rows), interpolation=cv2.INTER_LINEAR)
    sigma = noise.uniform(0.006, 0.018)
    img += (sigma * (0.5 + 0.5 * img)) * noise.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


def _generators(seed: Seed) -> list[np.random.Generator]:
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(2**63))
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def _resolve_findings(
    view: str, findings: dict[str, bool] | None, prevalence: float, rng: np.random.Generator
) -> dict[str, bool]:
    draws = rng.random(len(FINDINGS)) < prevalence  # drawn always, so seeds stay comparable
    if findings is None:
        wanted = (
            {name: bool(d) for name, d in zip(FINDINGS, draws, strict=True)} if view != "LL" else {}
        )
    else:
        unknown = sorted(set(findings) - set(FINDINGS))
        if unknown:
            raise PhantomError(
                f'Unknown finding "{unknown[0]}"; expected one of {", ".join(FINDINGS)}'
            )
        wanted = {name: bool(v) for name, v in findings.items()}
        if view == "LL" and any(wanted.values()):
            raise PhantomError("Findings are only rendered on frontal (PA/AP) views, not LL")
    return {name: wanted.get(name, False) for name in FINDINGS}


def render_phantom(
    seed: Seed,
    rows: int,
    columns: int,
    *,
    view: str = "PA",
    findings: dict[str, bool] | None = None,
    prevalence: float = 0.3,
    pixel_spacing_mm: float | None = None,
) -> Phantom:
    """Render one chest radiograph phantom.

    Args:
        seed: integer seed (or Generator / SeedSequence); same seed, same phantom.
        rows, columns: output size in pixels (16 .. 8192).
        view: "PA", "AP" or "LL" (left lateral; rendered without findings).
        findings: which findings to render (missing keys = absent); None draws
            each finding independently with probability ``prevalence``.
        pixel_spacing_mm: detector pixel spacing; None picks a 38-43 cm field.
    """
    if view not in VIEWS:
        raise PhantomError(f'View "{view}" is not supported; expected one of {", ".join(VIEWS)}')
    if not (16 <= rows <= 8192 and 16 <= columns <= 8192):
        raise PhantomError(f"Image size {rows}x{columns} is out of range 16..8192")
    if not 0.0 <= prevalence <= 1.0:
        raise PhantomError(f"Prevalence {prevalence} is not within 0..1")
    if isinstance(seed, int) and seed < 0:
        raise PhantomError(f"Seed {seed} must be a non-negative integer")
    geom, frng, noise, pick = _generators(seed)
    wanted = _resolve_findings(view, findings, prevalence, pick)
    fov = geom.uniform(380.0, 430.0)
    spacing = pixel_spacing_mm if pixel_spacing_mm else fov / max(rows, columns)
    canvas, mm_px = _canvas(geom, rows, columns, spacing, view)
    lungs: np.ndarray | None = None
    if view == "LL":
        att, boxes, ctr = _lateral(canvas, geom), [], 0.0
    else:
        att, boxes, ctr, work_lungs = _frontal(canvas, geom, frng, wanted, mm_px)
        lungs = cv2.resize(work_lungs.astype(np.uint8), (columns, rows),
                           interpolation=cv2.INTER_NEAREST).astype(bool)
    image = _finish(att, canvas, 0.85, rows, columns, noise, view)
    return Phantom(image, view, wanted, tuple(boxes), float(spacing), float(ctr), lungs)


def render_ct_slice(seed: Seed, rows: int, columns: int) -> np.ndarray:
    """A crude axial chest CT slice in Hounsfield units (int16), for "not a radiograph" tests."""
    rng = _generators(seed)[0]
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    u, v = (xx - columns / 2) / (0.42 * columns), (yy - rows * 0.52) / (0.3 * rows)
    hu = np.full((rows, columns), -1000.0, np.float32)
    hu[u**2 + v**2 < 1] = 40.0
    for side in _SIDES:
        lung = ((u - side * 0.45) / 0.35) ** 2 + ((v + 0.05) / 0.7) ** 2 < 1
        hu[lung] = -850.0
    hu[((u - 0.08) / 0.25) ** 2 + ((v + 0.25) / 0.35) ** 2 < 1] = 45.0  # heart
    spine = (u / 0.1) ** 2 + ((v - 0.7) / 0.18) ** 2
    hu[spine < 1] = 700.0
    hu[spine < 0.5] = 250.0
    hu[(yy > rows * 0.86) & (yy < rows * 0.89) & (np.abs(u) < 1.05)] = 300.0  # table
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16)
