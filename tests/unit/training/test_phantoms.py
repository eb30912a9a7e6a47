"""Phantoms: deterministic, fast, and each finding sits where its box says."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from training import phantoms
from training.phantoms import (
    ENLARGED_CTR,
    FINDINGS,
    NORMAL_CTR,
    Box,
    PhantomError,
    render_ct_slice,
    render_phantom,
)

BOXED = ("nodule", "pleural_effusion", "pneumothorax", "consolidation")


def test_same_seed_same_phantom_different_seed_different() -> None:
    a = render_phantom(11, 300, 240)
    b = render_phantom(11, 300, 240)
    c = render_phantom(12, 300, 240)
    assert np.array_equal(a.image, b.image)
    assert a.findings == b.findings and a.boxes == b.boxes
    assert not np.array_equal(a.image, c.image)


def test_generator_seed_is_accepted_and_deterministic() -> None:
    a = render_phantom(np.random.default_rng(5), 128, 128)
    b = render_phantom(np.random.default_rng(5), 128, 128)
    assert np.array_equal(a.image, b.image)


@pytest.mark.parametrize(("rows", "cols"), [(512, 512), (600, 480), (480, 640), (64, 64)])
def test_image_shape_dtype_and_range(rows: int, cols: int) -> None:
    p = render_phantom(1, rows, cols)
    assert p.image.shape == (rows, cols) and p.image.dtype == np.float32
    assert 0.0 <= float(p.image.min()) and float(p.image.max()) <= 1.0
    assert p.image.std() > 0.1  # real contrast, not a flat field
    assert p.pixel_spacing_mm == pytest.approx(p.pixel_spacing_mm)
    assert 380 <= p.pixel_spacing_mm * max(rows, cols) <= 430


def test_large_render_is_resized_not_drawn_at_full_size() -> None:
    p = render_phantom(3, 3000, 2500, findings={"nodule": True})
    assert p.image.shape == (3000, 2500)
    assert p.findings["nodule"] and p.boxes[0].label == "nodule"


def test_anatomy_lungs_dark_mediastinum_bright() -> None:
    img = render_phantom(4, 512, 512, findings={}).image
    lung = np.concatenate([img[180:260, 120:170].ravel(), img[180:260, 342:392].ravel()])
    mediastinum = img[150:250, 246:266]
    assert lung.mean() + 0.15 < mediastinum.mean()
    assert img[5:20, 0:5].mean() < lung.mean()  # air outside the body is darkest


def test_render_time_under_half_a_second_at_1024() -> None:
    render_phantom(0, 256, 256)  # warm caches
    best = min(_timed(lambda s=s: render_phantom(s, 1024, 1024)) for s in range(3))
    assert best < 0.5, f"1024 x 1024 render took {best:.3f} s"


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_prevalence_controls_random_findings() -> None:
    assert not any(
        any(render_phantom(s, 128, 128, prevalence=0.0).findings.values()) for s in range(5)
    )
    drawn = [render_phantom(s, 256, 256, prevalence=1.0) for s in range(3)]
    assert all(all(p.findings.values()) for p in drawn)
    assert all(len(p.boxes) == len(FINDINGS) for p in drawn)


@pytest.mark.parametrize("seed", range(6))
def test_all_findings_are_placed_with_valid_boxes(seed: int) -> None:
    p = render_phantom(seed, 400, 360, findings=dict.fromkeys(FINDINGS, True))
    assert all(p.findings.values())
    assert sorted(b.label for b in p.boxes) == sorted(FINDINGS)
    for box in p.boxes:
        assert 0.0 <= box.x0 < box.x1 <= 1.0 and 0.0 <= box.y0 < box.y1 <= 1.0
        cls, *vals = box.yolo().split()
        assert int(cls) == FINDINGS.index(box.label)
        assert all(0.0 <= float(v) <= 1.0 for v in vals)


@pytest.mark.parametrize("finding", BOXED)
@pytest.mark.parametrize("seed", [1, 7, 21])
def test_finding_changes_pixels_inside_its_box(finding: str, seed: int) -> None:
    """Same seed with and without one finding: the difference lives in the box."""
    normal = render_phantom(seed, 384, 320, findings={})
    sick = render_phantom(seed, 384, 320, findings={finding: True})
    (box,) = sick.boxes
    c0, r0, c1, r1 = box.to_pixels(384, 320)
    diff = sick.image - normal.image
    inside = np.abs(diff[r0:r1, c0:c1]).sum()
    assert inside > 0.9 * np.abs(diff).sum()
    direction = diff[r0:r1, c0:c1].mean()
    assert direction < 0 if finding == "pneumothorax" else direction > 0


@pytest.mark.parametrize("seed", range(5))
def test_nodule_box_brighter_than_surrounding_ring(seed: int) -> None:
    p = render_phantom(seed, 512, 512, findings={"nodule": True})
    (box,) = p.boxes
    c0, r0, c1, r1 = box.to_pixels(512, 512)
    pad = max(c1 - c0, r1 - r0) // 2 + 2
    outer = p.image[max(r0 - pad, 0) : r1 + pad, max(c0 - pad, 0) : c1 + pad]
    inner = p.image[r0:r1, c0:c1]
    ring_mean = (outer.sum() - inner.sum()) / (outer.size - inner.size)
    assert inner.mean() > ring_mean + 0.02


def test_nodule_diameter_between_8_and_30_mm() -> None:
    for seed in range(8):
        p = render_phantom(seed, 1024, 1024, findings={"nodule": True})
        (box,) = p.boxes
        width_mm = (box.x1 - box.x0) * 1024 * p.pixel_spacing_mm
        assert 6.0 <= width_mm <= 40.0  # 8-30 mm plus lobulation and soft edge


def test_cardiomegaly_ratio_and_heart_box() -> None:
    for seed in range(6):
        normal = render_phantom(seed, 256, 256, findings={"cardiomegaly": False})
        big = render_phantom(seed, 256, 256, findings={"cardiomegaly": True})
        assert NORMAL_CTR[0] <= normal.cardiothoracic_ratio <= NORMAL_CTR[1]
        assert big.cardiothoracic_ratio > 0.55 and big.cardiothoracic_ratio <= ENLARGED_CTR[1]
        assert normal.boxes == ()
        (box,) = big.boxes
        assert box.label == "cardiomegaly"
        assert 0.3 < box.x1 - box.x0 < 0.7  # the heart spans much of the thorax
        assert box.x0 < 0.5 < box.x1  # and straddles the midline


def test_lateral_has_no_findings() -> None:
    p = render_phantom(2, 300, 300, view="LL")
    assert p.view == "LL" and not any(p.findings.values()) and p.boxes == ()
    with pytest.raises(PhantomError, match="only rendered on frontal"):
        render_phantom(2, 300, 300, view="LL", findings={"nodule": True})


def test_box_helpers() -> None:
    box = Box("consolidation", 0.25, 0.5, 0.75, 1.0)
    assert box.class_index == 4
    assert box.yolo() == "4 0.500000 0.750000 0.500000 0.500000"
    assert box.to_pixels(100, 200) == (50, 50, 150, 100)


def test_ct_slice_is_in_hounsfield_units() -> None:
    hu = render_ct_slice(1, 128, 128)
    assert hu.dtype == np.int16 and hu.min() <= -900 and hu.max() >= 500


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"view": "XX"}, 'View "XX"'),
        ({"rows": 8}, "out of range"),
        ({"findings": {"fracture": True}}, 'Unknown finding "fracture"'),
        ({"prevalence": 1.5}, "Prevalence 1.5"),
        ({"seed": -1}, "Seed -1"),
    ],
)
def test_bad_requests_raise(kwargs: dict, match: str) -> None:
    args = {"seed": 0, "rows": 128, "columns": 128} | kwargs
    with pytest.raises(PhantomError, match=match):
        render_phantom(args.pop("seed"), args.pop("rows"), args.pop("columns"), **args)


def _branch_with_numpy(layer: np.ndarray, canvas: phantoms._Canvas, rng: np.random.Generator,
                       start: np.ndarray, angle: float, length: float, width: float,
                       depth: int) -> None:
    """The vessel tree as first written, with the canvas's numpy mapping and _stroke: the
    reference the float-only _branch must match pixel for pixel."""
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    thick_px = width * canvas.scale
    phantoms._stroke(layer, canvas, np.stack([start, end]), width,
                     min(1.0, 0.15 + thick_px / 3))
    if depth == 0:
        return
    for sign in (-1, 1):
        child = angle + sign * math.radians(rng.uniform(12, 32))
        _branch_with_numpy(layer, canvas, rng, end, child, length * rng.uniform(0.65, 0.85),
                           width * 0.72, depth - 1)


@pytest.mark.parametrize("h, w", [(224, 224), (517, 449), (1536, 1280)])
def test_vessel_trees_are_the_pixels_of_the_numpy_formulation(h: int, w: int) -> None:
    canvas = phantoms._Canvas(h=h, w=w, cx=w / 2 + 0.37, top=h * 0.08, scale=w / 1.31)
    ours, ref = (np.zeros((h, w), np.float32) for _ in range(2))
    for k in range(6):
        start = np.array([0.13 * (-1) ** k, 0.45])
        angle, length = -1.2 + 0.5 * k, 0.08 + 0.01 * k
        phantoms._branch(ours, canvas, np.random.default_rng(k), start, angle, length, 0.016, 4)
        _branch_with_numpy(ref, canvas, np.random.default_rng(k), start, angle, length, 0.016, 4)
    assert ours.any() and np.array_equal(ours, ref)
