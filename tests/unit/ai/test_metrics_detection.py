"""Detection metrics against values computed by hand on a tiny fixed set.

The set (boxes x0 y0 x1 y1, class 0 = nodule, class 1 = mass):

* image A: nodules g1 (0,0,10,10) and g2 (20,20,30,30); detections p1 = g1 (score 0.9),
  p2 (1,1,11,11) (0.8, IoU 81/119 = 0.68 with g1: a duplicate once p1 took g1), p3 = g2 (0.3);
* image B: nodule (5,5,15,15); detection (5,5,15,13) (0.6, IoU 0.8);
* image C: a mass (60,60,80,80) never detected; a nodule detection (40,40,50,50) (0.7) on no
  nodule.

Nodule detections by score: 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP, 0.3 TP with 3 references:
precision 1, 1/2, 1/3, 1/2, 3/5 at recall 1/3, 1/3, 1/3, 2/3, 1; envelope 1, .6, .6, .6, .6.
COCO 101-point AP50: 34 recall levels (0..0.33) at 1.0 and 67 (0.34..1) at 0.6 = 74.2/101.
At IoU > 0.8 image B's detection is a miss: envelope 1 for 34 levels, 0.4 for the 33 levels
up to 2/3, 0 above = 47.2/101; mAP50-95 = (7 x 74.2 + 3 x 47.2) / 1010 = 661/1010.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ai.reference.metrics_detection import (
    IOU_THRESHOLDS,
    ImageBoxes,
    best_f1_threshold,
    box_iou,
    evaluate_boxes,
    evaluate_detection,
    interpolated_ap,
    match_greedy,
    pooled_at_iou50,
    threshold_for_lesion_sensitivity,
    yolo_truth,
)
from ai.types import BoundingBox, CodedConcept, Finding, ImageResult, ModelIdentity

NAMES = ["nodule", "mass"]


def _boxes(rows: list[tuple[float, ...]], scores: bool = True) -> ImageBoxes:
    arr = np.asarray(rows, dtype=float).reshape(-1, 6 if scores else 5)
    return ImageBoxes(arr[:, :4], arr[:, 4].astype(int), arr[:, 5] if scores else None)


PREDS = [
    _boxes([(0, 0, 10, 10, 0, 0.9), (1, 1, 11, 11, 0, 0.8), (20, 20, 30, 30, 0, 0.3)]),
    _boxes([(5, 5, 15, 13, 0, 0.6)]),
    _boxes([(40, 40, 50, 50, 0, 0.7)]),
]
TRUTHS = [
    _boxes([(0, 0, 10, 10, 0), (20, 20, 30, 30, 0)], scores=False),
    _boxes([(5, 5, 15, 15, 0)], scores=False),
    _boxes([(60, 60, 80, 80, 1)], scores=False),
]


def test_iou_and_greedy_matching() -> None:
    iou = box_iou(np.array([[1, 1, 11, 11]]), np.array([[0, 0, 10, 10], [5, 5, 15, 15]]))
    assert iou[0, 0] == pytest.approx(81 / 119)
    assert iou[0, 1] == pytest.approx(36 / 164)
    # one detection between two references takes the better one; a second is a duplicate
    ious = np.array([[0.6, 0.9], [0.55, 0.7]])
    assert match_greedy(ious, 0.5).tolist() == [True, True]
    assert match_greedy(np.array([[0.9], [0.8]]), 0.5).tolist() == [True, False]
    assert match_greedy(np.array([[0.49]]), 0.5).tolist() == [False]


def test_interpolated_ap_edges() -> None:
    assert interpolated_ap(np.array([True]), 1) == pytest.approx(1.0)
    assert interpolated_ap(np.zeros(0, bool), 2) == 0.0
    assert math.isnan(interpolated_ap(np.array([False]), 0))
    # one hit at rank 2 of 2, one reference: precision 1/2 at every recall level
    assert interpolated_ap(np.array([False, True]), 1) == pytest.approx(0.5)


def test_ap50_map50_95_operating_point_against_hand_values() -> None:
    report = evaluate_boxes(PREDS, TRUTHS, NAMES, {"nodule": 0.65, "mass": 0.5})
    nodule, mass = report.by_name("nodule"), report.by_name("mass")
    assert nodule.ap50 == pytest.approx(74.2 / 101)
    assert nodule.ap[0.8] == pytest.approx(74.2 / 101)
    assert nodule.ap[0.85] == pytest.approx(47.2 / 101)
    assert nodule.ap50_95 == pytest.approx(661 / 1010)
    assert len(nodule.ap) == len(IOU_THRESHOLDS) == 10
    # score >= 0.65 keeps p1 (TP), p2 (duplicate) and image C's false positive
    assert (nodule.tp, nodule.fp, nodule.fn) == (1, 2, 2)
    assert nodule.precision == pytest.approx(1 / 3) and nodule.recall == pytest.approx(1 / 3)
    assert (nodule.images, nodule.instances, nodule.detections) == (2, 3, 5)
    assert mass.ap50 == 0.0 and mass.recall == 0.0 and math.isnan(mass.precision)
    assert (mass.images, mass.instances) == (1, 1)


def test_froc_against_hand_values() -> None:
    froc = evaluate_boxes(PREDS, TRUTHS, NAMES).by_name("nodule").froc
    # (FP/image, sensitivity) after each score: (0, 1/3) (1/3, 1/3) (2/3, 1/3) (2/3, 2/3) (2/3, 1)
    assert froc.rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert froc.sensitivity == pytest.approx((1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1))
    assert froc.cpm == pytest.approx(5 / 7)
    assert froc.curve[0] == (0.0, 0.0) and froc.curve[-1] == pytest.approx((2 / 3, 1.0))


def test_table_rows_in_the_fields_style() -> None:
    doc = evaluate_boxes(PREDS, TRUTHS, NAMES, [0.65, 0.5]).as_dict()
    rows = {r["class"]: r for r in doc["classes"]}
    assert list(rows) == ["all", "nodule", "mass"]
    assert (rows["all"]["images"], rows["all"]["instances"]) == (3, 4)
    assert rows["all"]["map50"] == pytest.approx((74.2 / 101 + 0) / 2)
    assert rows["all"]["recall"] == pytest.approx((1 / 3 + 0) / 2)
    assert rows["all"]["precision"] == pytest.approx(1 / 3)  # mass has no precision
    assert {"class", "images", "instances", "precision", "recall", "map50", "map50_95"} <= set(
        rows["nodule"]
    )
    assert doc["froc"]["nodule"]["cpm"] == pytest.approx(5 / 7)
    assert "101-point" in doc["conventions"]["ap"]


def test_class_without_references_has_no_ap() -> None:
    report = evaluate_boxes([_boxes([(0, 0, 5, 5, 0, 0.9)])], [ImageBoxes.empty()], ["nodule"])
    result = report.classes[0]
    assert math.isnan(result.ap50) and math.isnan(result.ap50_95) and math.isnan(result.recall)
    assert math.isnan(report.all_row()["map50"])


def test_thresholds_from_validation_detections() -> None:
    flags, scores, n_ref = pooled_at_iou50(PREDS, TRUTHS, 0)
    assert flags.tolist() == [True, False, False, True, True] and n_ref == 3
    # F1 = 2 TP / (detections + references): .5 .4 .33 .57 .75 -> all five, at the lowest score
    threshold, f1 = best_f1_threshold(flags, scores, n_ref)
    assert (threshold, f1) == (pytest.approx(0.3), pytest.approx(0.75))
    # sensitivity 0.6 needs 2 of 3 nodules: down to 0.6, halfway to the next score 0.3
    assert threshold_for_lesion_sensitivity(flags, scores, n_ref, 0.6) == pytest.approx(0.45)
    assert threshold_for_lesion_sensitivity(flags, scores, n_ref, 1 / 3) == pytest.approx(0.85)
    assert best_f1_threshold(np.zeros(0, bool), np.zeros(0), 0)[0] == 0.5


def test_yolo_truth_matches_paths_and_scales_to_pixels() -> None:
    doc = {
        "P1/S1/a.dcm": ["0 0.5 0.5 0.2 0.1", "2 0.1 0.1 0.1 0.1"],
        "P2/S2/b": [],  # without suffix, a negative image
        "missing.dcm": ["0 0.5 0.5 0.1 0.1"],
    }
    images = [("/data/P1/S1/a.dcm", 100, 200), ("/data/P2/S2/b.dcm", 50, 50), ("/data/c.dcm", 9, 9)]
    truths, notes = yolo_truth(doc, images, ["nodule"], ["nodule", "mass", "effusion"])
    assert truths[0] is not None
    assert truths[0].boxes[0].tolist() == pytest.approx([80.0, 45.0, 120.0, 55.0])
    assert truths[1] is not None and len(truths[1].boxes) == 0
    assert truths[2] is None
    assert notes == {"boxes_of_other_classes": 1, "keys_without_image": 1}
    with pytest.raises(ValueError, match="is not"):
        yolo_truth({"a.dcm": ["0 1 2"]}, [("a.dcm", 10, 10)], ["nodule"])


def test_training_evaluate_hook_uses_one_models_boxed_findings() -> None:
    det = ModelIdentity("det", "1", "2.25.1", "detection")
    cls = ModelIdentity("cls", "1", "2.25.2", "classification")
    code = CodedConcept("27925004", "SCT", "Nodule")

    def finding(model: ModelIdentity, p: float, box: BoundingBox | None) -> Finding:
        return Finding("nodule", code, p, 0.5, p >= 0.5, model, box)

    results = [
        (SimpleNamespace(path="/d/a.dcm"), ImageResult("1.1", 100, 100, [
            finding(det, 0.9, BoundingBox(10, 10, 20, 20)),
            finding(cls, 0.99, BoundingBox(50, 50, 90, 90)),  # another model: ignored
        ])),
        (SimpleNamespace(path="/d/b.dcm"), ImageResult("1.2", 100, 100, [
            finding(det, 0.4, BoundingBox(0, 0, 5, 5))])),
        (SimpleNamespace(path="/d/unlabelled.dcm"), ImageResult("1.3", 100, 100, [])),
    ]  # fmt: skip
    boxes = {"a.dcm": ["0 0.15 0.15 0.1 0.1"], "b.dcm": []}
    doc = evaluate_detection(results, boxes, [{"name": "nodule", "threshold": 0.5}], model=det)
    row = doc["classes"][1]
    assert (row["class"], row["images"], row["instances"]) == ("nodule", 1, 1)
    assert row["map50"] == pytest.approx(1.0)
    assert (row["tp"], row["fp"], row["precision"], row["recall"]) == (1, 0, 1.0, 1.0)
    assert doc["images"] == 2 and doc["notes"]["images_without_boxes"] == 1
    with pytest.raises(ValueError, match="no evaluated image"):
        evaluate_detection(results[2:], boxes, ["nodule"])
