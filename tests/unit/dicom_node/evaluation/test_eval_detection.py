"""Reference runs of detection bundles: AP50 / FROC rows against ``reference.boxes_json``
(a YOLO JSON map), next to the classification rows of the same run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from evalhelpers import (
    FixedAnalyzer,
    ReferenceSet,
    eval_settings,
    make_reference_set,
    reference_job,
    temp_engine,
)
from helpers.bundles import make_tiny_bundle
from sqlalchemy import Engine, select

from ai.bundle.load import build_model, save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import default_code
from ai.types import BoundingBox, Finding, ImageResult, ModelIdentity
from dicom_node.config import ConfigError, load_settings
from dicom_node.evaluation.service import EvaluationService
from dicom_node.store import db

DET = ModelIdentity(name="fixed-detector", version="1.0", device_uid="2.25.778", task="detection")
NODULE = default_code("nodule")
TINY_DET = {"backbone": "resnet10", "widen_factor": 0.25, "fpn_channels": 16, "head_convs": 1,
            "anchor_sizes": [16, 32], "detections_per_img": 3}  # fmt: skip


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield from temp_engine(tmp_path)


def _metrics_rows(engine: Engine, run_id: int) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(db.evaluation_metrics)
                                 .where(db.evaluation_metrics.c.run_id == run_id)))


# --------------------------------------------------------------------------------------------
# Real bundles: a tiny classifier and a tiny random RetinaNet on synthetic phantoms


def _detector_bundle(directory: Path) -> Path:
    """A random detector whose every anchor scores high: NMS keeps 3 boxes per image."""
    torch.manual_seed(0)
    assert NODULE is not None
    meta = BundleMetadata(
        name="tiny-test-detector", version="0.0.1", task="detection",
        labels=(LabelSpec("nodule", NODULE, 0.5),), network=NetworkSpec("retinanet", TINY_DET),
        input=InputSpec(size=64), demo=True)  # fmt: skip
    model = build_model(meta)
    with torch.no_grad():
        model.network.classification_head.cls_logits.bias.fill_(6.0)
    save_bundle(directory, meta, model)
    return directory


def test_reference_run_stores_classification_and_detection_rows(engine: Engine,
                                                                tmp_path: Path) -> None:
    from ai.inference import Analyzer
    from training.synth import synthesize

    data = tmp_path / "phantoms"
    synthesize(data, 6, seed=3, size=(288, 256), variants=["dx_mono2_explicit"], prevalence=0.6)
    analyzer = Analyzer([make_tiny_bundle(tmp_path / "cls"), _detector_bundle(tmp_path / "det")],
                        device="cpu", gradcam=False)
    job = {"name": "ref", "kind": "reference", "reference": {
        "dicom_dir": str(data), "labels_csv": str(data / "labels.csv"),
        "boxes_json": str(data / "boxes.json")}}  # classes.txt beside it
    service = EvaluationService(engine, eval_settings(tmp_path / "data", [job]),
                                deployed=lambda: analyzer)
    detail = service.run_now("ref")
    assert detail.run.state == "succeeded", detail.run.error
    rows = {(r.model_name, r.label): r for r in _metrics_rows(engine, detail.run.id)}
    assert ("tiny-test-classifier", "nodule") in rows and ("tiny-test-classifier",
                                                            "cardiomegaly") in rows
    assert all(r.ap50 is None and r.froc is None for (name, _), r in rows.items()
               if name == "tiny-test-classifier")
    det = rows[("tiny-test-detector", "nodule")]
    assert isinstance(det.ap50, float) and 0.0 <= det.ap50 <= 1.0
    froc = json.loads(det.froc)
    assert froc and all(len(p) == 2 and 0.0 <= p[1] <= 1.0 for p in froc)
    n = detail.run.n_images
    assert det.n_pos + det.n_neg == n and det.tp + det.fp + det.tn + det.fn == n
    assert detail.run.summary is not None and detail.run.summary["images_with_box_truth"] == n
    assert {m["task"] for m in detail.run.models} == {"classification", "detection"}


# --------------------------------------------------------------------------------------------
# A hand-controlled detector: fixed boxes, AP50 computed by hand


class BoxAnalyzer(FixedAnalyzer):
    """The fixed classifier plus a detector with fixed boxes per SOP UID."""

    def __init__(self, probs: dict[str, dict[str, float]],
                 boxes: dict[str, Sequence[tuple[float, BoundingBox]]]) -> None:
        super().__init__(probs)
        self.boxes = boxes

    @property
    def models(self) -> list[ModelIdentity]:
        return [*super().models, DET]

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        out = super().analyze(datasets)
        assert NODULE is not None
        for result in out:
            result.findings += [Finding("nodule", NODULE, p, 0.5, p >= 0.5, DET, box)
                                for p, box in self.boxes.get(result.sop_instance_uid, ())]
            result.models.append(DET)
        return out


@pytest.fixture(scope="module")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


def _hand_case(refset: ReferenceSet, folder: Path) -> tuple[BoxAnalyzer, Path]:
    """Five images in the box map (260 x 256 px), the other five not evaluated.

    ======  =====================  ===============================  =========================
    image   reference box          predicted boxes (score)          image level (thr. 0.5)
    ======  =====================  ===============================  =========================
    0       centre                 centre (0.9): TP                 truth 1, call 1: TP
    1       centre                 corner (0.8): FP; centre missed  truth 1, call 1: TP
    2       none                   corner (0.7): FP                 truth 0, call 1: FP
    3       centre                 centre (0.4): TP                 truth 1, call 0: FN
    4       none                   none                             truth 0, call 0: TN
    ======  =====================  ===============================  =========================

    By score: TP, FP, FP, TP of 3 boxes -> recall 1/3 at precision 1, then 2/3 at 1/2.
    COCO 101-point AP50 = (34 * 1 + 33 * 1/2) / 101 = 0.5 (recall points 0 .. 0.33 see
    precision 1, 0.34 .. 0.66 see 1/2, 0.67 .. 1 nothing).
    FROC over 5 images: 1/8 FP per image allows no FP -> 1/3; 1/4 (1.25 FP) still 1/3;
    1/2 (2.5 FP) reaches the TP after the two FPs -> 2/3.
    """
    centre = BoundingBox(96.0, 97.5, 160.0, 162.5)  # "0 0.5 0.5 0.25 0.25" on 256 x 260
    corner = BoundingBox(0.0, 0.0, 30.0, 30.0)
    s = refset.sop_uids
    boxes = {s[0]: [(0.9, centre)], s[1]: [(0.8, corner)], s[2]: [(0.7, corner)],
             s[3]: [(0.4, centre)]}
    line = "0 0.5 0.5 0.25 0.25"
    doc = {f"case{i:02d}/{s[i]}.dcm": lines
           for i, lines in enumerate([[line], [line], [], [line], []])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "boxes.json").write_text(json.dumps(doc), encoding="utf-8")
    (folder / "names.txt").write_text("nodule\ncardiomegaly\n", encoding="utf-8")
    return BoxAnalyzer(refset.probs, boxes), folder / "boxes.json"


def _box_job(refset: ReferenceSet, boxes_json: Path | None, **reference: str) -> dict[str, Any]:
    job = reference_job(refset)
    if boxes_json is not None:
        job["reference"] |= {"boxes_json": str(boxes_json), **reference}
    return job


def test_fixed_boxes_give_the_hand_computed_ap50(engine: Engine, tmp_path: Path,
                                                 refset: ReferenceSet) -> None:
    analyzer, boxes_json = _hand_case(refset, tmp_path / "truth")
    job = _box_job(refset, boxes_json, classes_txt=str(boxes_json.parent / "names.txt"))
    job["floors"] = {"nodule": {"specificity": 0.6}}
    service = EvaluationService(engine, eval_settings(tmp_path / "data", [job]),
                                deployed=lambda: analyzer)
    detail = service.run_now("ref")
    assert detail.run.state == "succeeded", detail.run.error
    figs = {(f.model_name, f.label): f for f in detail.figures}
    assert set(figs) == {("fixed-model", "nodule"), ("fixed-model", "cardiomegaly"),
                         ("fixed-detector", "nodule")}
    cls = figs[("fixed-model", "nodule")]  # unchanged by the detector's findings
    assert (cls.tp, cls.fp, cls.tn, cls.fn) == (3, 2, 4, 1) and cls.ap50 is None
    det = figs[("fixed-detector", "nodule")]
    assert det.ap50 == pytest.approx(0.5)
    assert det.froc is not None
    froc = dict(det.froc)
    assert froc[0.125] == froc[0.25] == pytest.approx(1 / 3)
    assert froc[0.5] == froc[8.0] == pytest.approx(2 / 3)
    assert (det.n_pos, det.n_neg, det.tp, det.fp, det.tn, det.fn) == (3, 2, 2, 1, 1, 1)
    assert det.sensitivity.value == pytest.approx(2 / 3)
    assert det.specificity.value == pytest.approx(0.5)
    # the floor works on the detector's image-level figures as on a classifier's
    assert [(a.model_name, a.metric) for a in detail.alerts] == [("fixed-detector",
                                                                  "specificity")]
    (row,) = [r for r in _metrics_rows(engine, detail.run.id) if r.model_name == "fixed-detector"]
    assert row.ap50 == pytest.approx(0.5)
    assert json.loads(row.froc) == [[pytest.approx(a), pytest.approx(b)] for a, b in det.froc]
    assert not math.isnan(row.sensitivity)
    from dicom_node.evaluation.report import format_run

    text = format_run(detail)  # what `dicom-node evaluate --now` prints
    assert "nodule: AP50 0.500; FROC sensitivity at FP/image 0.125:0.333" in text
    assert detail.run.summary is not None
    assert detail.run.summary["images_with_box_truth"] == 5
    assert detail.run.summary["reference_boxes"] == 3


def test_detection_bundle_without_boxes_json_fails_naming_the_key(engine: Engine, tmp_path: Path,
                                                                  refset: ReferenceSet) -> None:
    analyzer, _ = _hand_case(refset, tmp_path / "truth")
    service = EvaluationService(engine, eval_settings(tmp_path / "data", [_box_job(refset, None)]),
                                deployed=lambda: analyzer)
    run = service.run_now("ref").run
    assert run.state == "failed"
    assert "reference.boxes_json" in (run.error or "") and "fixed-detector" in (run.error or "")
    assert analyzer.calls == []  # refused before any image is analysed


def test_box_map_errors_name_the_setting(engine: Engine, tmp_path: Path,
                                         refset: ReferenceSet) -> None:
    analyzer, boxes_json = _hand_case(refset, tmp_path / "truth")
    bad = tmp_path / "bad.json"
    bad.write_text('{"case00/x.dcm": "not a list"}', encoding="utf-8")
    (tmp_path / "classes.txt").write_text("nodule\n", encoding="utf-8")
    for path, expected in ((bad, "reference.boxes_json"),
                           (boxes_json, "classes_txt")):  # no classes.txt beside it
        service = EvaluationService(engine, eval_settings(tmp_path / "data",
                                                          [_box_job(refset, path)]),
                                    deployed=lambda: analyzer)
        run = service.run_now("ref").run
        assert run.state == "failed" and expected in (run.error or ""), run.error


@pytest.mark.parametrize(("reference", "match"), [
    ({"boxes_json": "/r/boxes.csv"}, r"reference\.boxes_json '/r/boxes\.csv' must be a YOLO JSON"),
    ({"classes_txt": "/r/classes.txt"}, r"reference\.classes_txt .* only used with"),
])
def test_box_settings_are_validated(reference: dict[str, str], match: str) -> None:
    job = {"name": "ref", "kind": "reference",
           "reference": {"dicom_dir": "/r", "labels_csv": "/r/l.csv", **reference}}
    with pytest.raises(ConfigError, match=match):
        load_settings(None, overrides={"evaluation.jobs": [job]}, environ={})


def test_classes_txt_defaults_to_beside_the_box_map() -> None:
    job = {"name": "ref", "kind": "reference", "reference": {
        "dicom_dir": "/r", "labels_csv": "/r/l.csv", "boxes_json": "/r/b/boxes.json"}}
    settings = load_settings(None, overrides={"evaluation.jobs": [job]}, environ={})
    ref = settings.evaluation.jobs[0].reference
    assert ref is not None and ref.classes_path == Path("/r/b/classes.txt")
