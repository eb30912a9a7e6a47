"""Overlay labels a radiologist can read: never over each other, the banner or the edge.

Crowded synthetic findings (12 positive boxes, overlapping, some on the image edges) on a
tiny and on a full-size radiograph; the label rectangles the SC burns in, and the GSPS text
boxes, must be pairwise disjoint, inside the image and below the banner lines.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from outputs_helpers import DETECTOR, NODULE, make_source
from pydicom.dataset import Dataset

from ai.types import BoundingBox, Finding, ImageResult
from dicom_node.outputs import OutputSettings, build_outputs
from dicom_node.outputs.common import finding_text, prepare_sources
from dicom_node.outputs.render import BOX_COLOURS, LABEL_BACKGROUND, layout_labels
from dicom_node.outputs.sc import render_overlay

Rect = tuple[float, float, float, float]


def _crowded(rows: int, cols: int, count: int = 12) -> tuple[Dataset, ImageResult]:
    """``count`` positive findings: a cluster of overlapping boxes in the middle, and boxes
    on the top, bottom, left and right edges and in the corners."""
    u, v = cols / 100.0, rows / 100.0  # percent of the width / height
    spots = [
        (40, 40, 55, 55), (45, 42, 60, 58), (42, 47, 58, 62), (50, 50, 62, 60),
        (0, 0, 12, 10), (88, 0, 100, 12), (0, 90, 10, 100), (90, 88, 100, 100),
        (30, 0, 45, 6), (0, 30, 5, 50), (95, 40, 100, 60), (35, 94, 60, 100),
    ]
    findings = [
        Finding(f"Nodule{k}", NODULE, 0.5 + k / 40, 0.5, True, DETECTOR,
                BoundingBox(x0 * u, y0 * v, x1 * u, y1 * v))
        for k, (x0, y0, x1, y1) in enumerate(spots[:count])
    ]  # fmt: skip
    ds = make_source(rows=rows, cols=cols)
    display = np.full((rows, cols), 90, np.uint8)  # the model's rendering: no decode needed
    result = ImageResult(str(ds.SOPInstanceUID), rows, cols, findings=findings,
                         models=[DETECTOR], display=display)  # fmt: skip
    return ds, result


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _assert_laid_out(rects: list[Rect], rows: int, cols: int, top: float) -> None:
    for rect in rects:
        assert 0 <= rect[0] < rect[2] <= cols and top <= rect[1] < rect[3] <= rows, rect
    for a, b in combinations(rects, 2):
        assert not _overlaps(a, b), (a, b)


@pytest.mark.parametrize(("rows", "cols"), [(300, 300), (3000, 2500), (200, 300)])
def test_sc_labels_are_disjoint_inside_the_image_and_below_the_banner(rows: int, cols: int) -> None:
    ds, result = _crowded(rows, cols)
    (source,) = prepare_sources([(ds, result)])
    overlay = render_overlay(source, OutputSettings())
    assert overlay.banner_bottom > 0
    _assert_laid_out([label.rect for label in overlay.labels], rows, cols, overlay.banner_bottom)
    labelled = {label.text for label in overlay.labels}
    everything = {finding_text(f) for f in result.findings}
    # every finding is named once: beside its box, or (no room left) in the summary line
    missing = everything - labelled
    assert not missing or (overlay.summary and all(t in overlay.summary for t in missing))
    if rows >= 300 and cols >= 300:
        assert labelled == everything, "a radiograph this size has room for every label"
    pixels = overlay.pixels
    for index, label in enumerate(overlay.labels):
        left, top, right, bottom = label.rect
        patch = pixels[top:bottom, left:right].reshape(-1, 3)
        assert (patch == LABEL_BACKGROUND).all(axis=1).any(), label
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        assert (patch.astype(int) - colour == 0).all(axis=1).any(), f"no text in {label}"


def test_labels_never_cover_the_banner_rows_of_the_burnt_in_image() -> None:
    rows, cols = 300, 300
    ds, result = _crowded(rows, cols)
    sc = build_outputs([(ds, result)], OutputSettings(sr=False, gsps=False), "s")[0].dataset
    banner = sc.pixel_array[:, 1]  # column 1: banner colour wherever the banner is
    (source,) = prepare_sources([(ds, result)])
    overlay = render_overlay(source, OutputSettings())
    assert (sc.pixel_array == overlay.pixels).all()  # the SC carries exactly this overlay
    first_label_row = min(label.rect[1] for label in overlay.labels)
    assert (banner[:overlay.banner_bottom] != 90).all(axis=1).all()  # banner drawn there
    assert first_label_row >= overlay.banner_bottom


def test_gsps_text_boxes_are_disjoint_inside_the_image_and_below_the_banner() -> None:
    rows, cols = 300, 300
    ds, result = _crowded(rows, cols)
    (gsps,) = [o.dataset for o in build_outputs([(ds, result)], OutputSettings(sc=False), "s")
               if o.kind == "gsps"]  # fmt: skip
    (annotation,) = gsps.GraphicAnnotationSequence
    pixel_boxes = [
        (*t.BoundingBoxTopLeftHandCorner, *t.BoundingBoxBottomRightHandCorner)
        for t in annotation.TextObjectSequence
        if t.BoundingBoxAnnotationUnits == "PIXEL"
    ]
    banner_bottom = max(
        float(t.BoundingBoxBottomRightHandCorner[1]) * rows
        for t in annotation.TextObjectSequence
        if t.BoundingBoxAnnotationUnits == "DISPLAY"
    )
    assert len(pixel_boxes) == 12
    _assert_laid_out([tuple(float(v) for v in b) for b in pixel_boxes], rows, cols, banner_bottom)


def test_no_room_left_gives_none_never_an_overlap() -> None:
    boxes = [(2.0, 2.0 + 4 * k, 10.0, 5.0 + 4 * k) for k in range(12)]
    layout = layout_labels([f"Finding {k} 99%" for k in range(12)], boxes, 40, 60, top_limit=10)
    placed = [label.rect for label in layout if label is not None]
    assert None in layout and placed
    _assert_laid_out(placed, 40, 60, 10)
