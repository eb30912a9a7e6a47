"""Reference-set runs: figures against hand-computed values, exclusions counted, the label
file's keys (SOP UID, path, study) and its errors."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from evalhelpers import (
    NODULE_TRUTH,
    FixedAnalyzer,
    ReferenceSet,
    eval_settings,
    make_image,
    make_reference_set,
    reference_job,
    temp_engine,
)
from helpers.dicomfiles import write
from sqlalchemy import Engine, select

from ai.reference.localisation import image_entry, write_locations
from ai.types import ImageResult, OodVerdict
from dicom_node.evaluation.errors import EvaluationError
from dicom_node.evaluation.reference import read_reference_labels
from dicom_node.evaluation.report import format_run
from dicom_node.evaluation.service import EvaluationService
from dicom_node.store import db


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield from temp_engine(tmp_path)


@pytest.fixture(scope="module")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


def _service(engine: Engine, tmp_path: Path, jobs: list[dict], analyzer: FixedAnalyzer
             ) -> EvaluationService:
    return EvaluationService(engine, eval_settings(tmp_path / "data", jobs),
                             deployed=lambda: analyzer)


def test_figures_match_hand_computed_values(engine: Engine, tmp_path: Path,
                                            refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, [reference_job(refset)], FixedAnalyzer(refset.probs))
    detail = service.run_now("ref")
    assert detail.run.state == "succeeded", detail.run.error
    figs = {f.label: f for f in detail.figures}
    assert set(figs) == {"nodule", "cardiomegaly"}  # pneumothorax is not in the label file
    n = figs["nodule"]
    assert (n.n_pos, n.n_neg, n.tp, n.fp, n.tn, n.fn) == (4, 6, 3, 2, 4, 1)
    assert n.threshold == 0.5
    assert n.sensitivity.value == pytest.approx(0.75)
    assert (n.sensitivity.lower, n.sensitivity.upper) == pytest.approx((0.30064, 0.95441), abs=1e-4)
    assert n.specificity.value == pytest.approx(4 / 6)
    assert (n.specificity.lower, n.specificity.upper) == pytest.approx((0.29999, 0.90323), abs=1e-4)
    assert n.ppv.value == pytest.approx(0.6)
    assert (n.ppv.lower, n.ppv.upper) == pytest.approx((0.23072, 0.88238), abs=1e-4)
    assert n.npv.value == pytest.approx(0.8)
    assert (n.npv.lower, n.npv.upper) == pytest.approx((0.37553, 0.96378), abs=1e-4)
    assert n.f1 == pytest.approx(6 / 9)
    assert n.auroc.value == pytest.approx(20 / 24)
    assert 0.0 <= n.auroc.lower <= 20 / 24 <= n.auroc.upper <= 1.0
    assert n.roc[0] == (0.0, 0.0) and n.roc[-1] == (1.0, 1.0)
    assert (2 / 6, 3 / 4) in [(pytest.approx(a), pytest.approx(b)) for a, b in n.roc]
    c = figs["cardiomegaly"]  # no positive case: sensitivity and AUROC undefined, not 0
    assert (c.n_pos, c.n_neg, c.tp, c.fp, c.tn, c.fn) == (0, 10, 0, 2, 8, 0)
    assert c.sensitivity.as_dict()["value"] is None and c.auroc.as_dict()["value"] is None
    assert c.specificity.value == pytest.approx(0.8)
    assert c.roc == []


def test_run_records_model_thresholds_and_exclusions(engine: Engine, tmp_path: Path,
                                                     refset: ReferenceSet) -> None:
    service = _service(engine, tmp_path, [reference_job(refset)], FixedAnalyzer(refset.probs))
    run = service.run_now("ref").run
    assert run.n_images == 10 and run.trigger == "manual" and run.kind == "reference"
    assert run.models == [{"name": "fixed-model", "version": "2.0", "device_uid": "2.25.777",
                           "task": "classification", "demo": False, "thresholds":
                           {"cardiomegaly": 0.3, "nodule": 0.5, "pneumothorax": 0.5}}]
    s = run.summary
    assert s is not None
    assert s["files"] == 13 and s["non_dicom_files"] == 1 and s["analysed"] == 10
    assert sum(s["excluded"].values()) == 2
    assert any("view position LL" in r for r in s["excluded"])
    assert any("not a projection radiograph" in r for r in s["excluded"])
    assert s["images_without_labels"] == 1 and s["labels_without_images"] == 1
    assert s["labels_not_in_reference"] == ["pneumothorax"] and s["unit"] == "image"
    with engine.connect() as conn:
        rows = conn.execute(select(db.evaluation_metrics)).all()
    assert {r.label for r in rows} == {"nodule", "cardiomegaly"}
    nodule = next(r for r in rows if r.label == "nodule")
    assert (nodule.tp, nodule.sensitivity, nodule.sensitivity_lo is not None) == (3, 0.75, True)
    assert json.loads(nodule.roc)[0] == [0.0, 0.0]


def test_images_of_one_study_are_analysed_together_like_a_job(
        engine: Engine, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    study = "1.2.826.0.1.3680043.8.498.1"
    a, b = make_image(study_uid=study, seed=1), make_image(study_uid=study, seed=2)
    for ds in (a, b):
        write(ds, ref)
    (tmp_path / "labels.csv").write_text(f"study_instance_uid,nodule\n{study},1\n")
    analyzer = FixedAnalyzer({a.SOPInstanceUID: {"nodule": 0.2},
                              b.SOPInstanceUID: {"nodule": 0.7}})
    job = {"name": "s", "kind": "reference",
           "reference": {"dicom_dir": str(ref), "labels_csv": str(tmp_path / "labels.csv")}}
    detail = _service(engine, tmp_path, [job], analyzer).run_now("s")
    assert sorted(map(sorted, analyzer.calls)) == [sorted([a.SOPInstanceUID, b.SOPInstanceUID])]
    nodule = next(f for f in detail.figures if f.label == "nodule")
    # study-level: positive because one image is, probability the maximum
    assert (nodule.n_pos, nodule.tp, nodule.fn) == (1, 1, 0)
    assert detail.run.summary is not None and detail.run.summary["unit"] == "study"


def test_path_keys_multiclass_and_unusable_pixels(engine: Engine, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    images = [make_image(seed=i) for i in range(3)]
    for i, ds in enumerate(images):
        write(ds, ref / f"d{i}", "img.dcm")
    (tmp_path / "labels.csv").write_text(
        "path,label\nd0/img.dcm,nodule\nd1/img.dcm,No Finding\nd2/img.dcm,nodule\n")
    analyzer = FixedAnalyzer({images[0].SOPInstanceUID: {"nodule": 0.9},
                              images[1].SOPInstanceUID: {"nodule": 0.1}},
                             bad_pixels=[images[2].SOPInstanceUID])
    job = {"name": "p", "kind": "reference",
           "reference": {"dicom_dir": str(ref), "labels_csv": str(tmp_path / "labels.csv")}}
    detail = _service(engine, tmp_path, [job], analyzer).run_now("p")
    assert [f.label for f in detail.figures] == ["nodule"]
    f = detail.figures[0]
    assert (f.tp, f.fp, f.tn, f.fn) == (1, 0, 1, 0)
    assert detail.run.summary is not None
    assert detail.run.summary["excluded"] == {"pixel data unusable": 1}


@pytest.mark.parametrize(("text", "match"), [
    ("nodule\n1\n", "no key column"),
    ("sop_instance_uid,nodule\n1.2.3,2\n", 'line 2: column "nodule" has value "2"'),
    ("sop_instance_uid,nodule\n1.2.3,1\n1.2.3,0\n", "on lines 2 and 3 has different labels"),
    ("sop_instance_uid,nodule\n", "no label rows"),
])
def test_label_file_errors_name_line_column_and_value(tmp_path: Path, text: str,
                                                      match: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(EvaluationError, match=match):
        read_reference_labels(path)


def test_missing_reference_fails_the_run_with_its_reason(engine: Engine, tmp_path: Path
                                                         ) -> None:
    job = {"name": "gone", "kind": "reference",
           "reference": {"dicom_dir": str(tmp_path / "nope"), "labels_csv": "x.csv"}}
    run = _service(engine, tmp_path, [job], FixedAnalyzer()).run_now("gone").run
    assert run.state == "failed"
    assert "reference dicom_dir" in (run.error or "") and "does not exist" in (run.error or "")


def test_synth_label_file_is_read(tmp_path: Path) -> None:
    from training.synth import LABEL_COLUMNS

    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(LABEL_COLUMNS)
        w.writerow(["1.2.3", "p/s/1.2.3.dcm", "1.2", "PH1", "PA", 1, 0, 0, 1, 0])
    labels = read_reference_labels(path)
    assert labels.key == "sop"
    assert labels.labels == ("nodule", "cardiomegaly", "pleural_effusion", "pneumothorax",
                             "consolidation")
    assert labels.truth("1.2.3", "pneumothorax") == 1 and labels.truth("1.2.3", "view") is None
    assert labels.truth("1.2.3", "Pleural Effusion") == 0  # names match as training does


class MapAnalyzer(FixedAnalyzer):
    """FixedAnalyzer plus a Grad-CAM map per positive finding: its maximum on the nodule box
    for the images in ``on_box``, far from it otherwise; a quarter of the mass in the lungs
    (the left half of the image)."""

    def __init__(self, probs: dict[str, dict[str, float]], on_box: set[str]) -> None:
        super().__init__(probs)
        self.on_box = on_box

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        results = super().analyze(datasets)
        for result in results:
            for f in result.findings:
                if f.positive:
                    heat = np.zeros((result.rows, result.columns), np.float32)
                    heat[100:102, 20:22] = 0.25  # 1.0 in the lungs
                    peak = (160, 160) if result.sop_instance_uid in self.on_box else (10, 200)
                    heat[peak] = 1.0  # 1.0 outside them, on the box or far from it
                    result.finding_heatmaps[(f.model.device_uid, f.label)] = heat
        return results


def test_localisation_figures_with_a_locations_sidecar(engine: Engine, tmp_path: Path) -> None:
    """A locations.json beside the labels: per label the pointing-game hit rate and the
    lung energy of the true positives (nodule cases 0-2; case 3 is a false negative), in
    the run's figures and the metrics row; labels without a true positive stay null."""
    ref = make_reference_set(tmp_path / "loc")
    lungs = np.zeros((64, 64), bool)
    lungs[:, :32] = True
    write_locations(ref.dicom_dir / "locations.json", {
        f"case{i:02d}/{sop}.dcm": image_entry(
            [("nodule", (0.5, 0.5, 0.75, 0.75))] if truth else [], lungs)
        for i, (sop, truth) in enumerate(zip(ref.sop_uids, NODULE_TRUTH, strict=True))})
    analyzer = MapAnalyzer(ref.probs, on_box=set(ref.sop_uids[:2]))
    detail = _service(engine, tmp_path, [reference_job(ref)], analyzer).run_now("ref")
    assert detail.run.state == "succeeded", detail.run.error
    figs = {f.label: f for f in detail.figures}
    loc = figs["nodule"].localisation
    assert loc is not None and (loc["tp_images"], loc["hits"]) == (3, 2)
    assert loc["hit_rate"]["value"] == pytest.approx(2 / 3)
    assert loc["lung_energy"] == pytest.approx(0.5)
    assert figs["cardiomegaly"].localisation is None  # no true positive to point with
    text = format_run(detail)  # `dicom-node evaluate --now` prints it under the table
    assert "  nodule: Grad-CAM pointing-game hit rate 0.667 (2/3 true positives), energy in " \
           "the lungs 0.500" in text
    assert "cardiomegaly: Grad-CAM" not in text
    with engine.connect() as conn:
        rows = {r.label: r for r in conn.execute(select(db.evaluation_metrics)).all()}
    assert json.loads(rows["nodule"].localisation)["hits"] == 2
    assert rows["cardiomegaly"].localisation is None


def test_no_locations_no_localisation(engine: Engine, tmp_path: Path,
                                      refset: ReferenceSet) -> None:
    detail = _service(engine, tmp_path, [reference_job(refset)],
                      MapAnalyzer(refset.probs, set(refset.sop_uids))).run_now("ref")
    assert all(f.localisation is None for f in detail.figures)


class GatedAnalyzer(FixedAnalyzer):
    """FixedAnalyzer whose gate withholds one image: no findings, an out-of-range verdict."""

    def __init__(self, probs: dict[str, dict[str, float]], withheld_uid: str) -> None:
        super().__init__(probs)
        self.withheld_uid = withheld_uid

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        out = super().analyze(datasets)
        for result in out:
            if result.sop_instance_uid == self.withheld_uid:
                result.findings = []
                result.ood = [OodVerdict(result.models[0], score=30.0, threshold=9.0)]
        return out


def test_images_withheld_by_the_gate_are_left_out_and_counted(
        engine: Engine, tmp_path: Path, refset: ReferenceSet) -> None:
    """A withheld image is not a negative: the model's figures leave it out, the run's
    summary counts it per model."""
    uid = sorted(refset.probs)[0]
    service = _service(engine, tmp_path, [reference_job(refset)],
                       GatedAnalyzer(refset.probs, uid))
    detail = service.run_now("ref")
    assert detail.run.state == "succeeded", detail.run.error
    n = {f.label: f for f in detail.figures}["nodule"]
    assert n.n_pos + n.n_neg == 9  # 10 labelled images, one withheld
    assert detail.run.summary["withheld_out_of_distribution"] == {"fixed-model 2.0": 1}
    assert "out-of-distribution gate (not in its figures):\n      1  fixed-model 2.0" in (
        format_run(detail))
    plain = _service(engine, tmp_path, [reference_job(refset)], FixedAnalyzer(refset.probs))
    assert plain.run_now("ref").run.summary["withheld_out_of_distribution"] == {}
