"""``training evaluate``: hand-computed figures through a stub analyzer, and the real path
(tiny bundle, phantom DICOM, the node's Analyzer) with the files it writes."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from ai.inference import Analyzer
from ai.types import CodedConcept, Finding, ImageResult, ModelIdentity
from training.cli import main
from training.evaluate import (
    EvaluateError,
    LabelledImage,
    LabelledSet,
    evaluate_predictions,
    load_labelled_set,
    predict,
)
from training.report import markdown_report, write_evaluation
from training.synth import synthesize

STUB = ModelIdentity("stub-model", "1.0.0", "1.2.826.0.1.3680043.10.1.1", "classification")
CODE = CodedConcept("27925004", "SCT", "Nodule")

# nodule: 6 positives, 6 negatives, threshold 0.5
POS = [0.95, 0.85, 0.75, 0.55, 0.45, 0.30]
NEG = [0.80, 0.40, 0.35, 0.25, 0.20, 0.10]


class StubAnalyzer:
    """Returns fixed probabilities per SOP Instance UID, like ai.inference.Analyzer would."""

    def __init__(self, scores: dict[str, dict[str, float]], thresholds: dict[str, float]):
        self.scores, self.thresholds = scores, thresholds
        self.calls: list[int] = []

    @property
    def models(self) -> list[ModelIdentity]:
        return [STUB]

    def analyze(self, datasets: list[Dataset]) -> list[ImageResult]:
        self.calls.append(len(datasets))
        out = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            findings = [Finding(label, CODE, p, self.thresholds[label], p >= self.thresholds[label],
                                STUB) for label, p in self.scores[uid].items()]  # fmt: skip
            out.append(ImageResult(uid, 10, 10, findings, models=[STUB]))
        return out


def _stub_set() -> tuple[LabelledSet, StubAnalyzer]:
    images, scores = [], {}
    for i, (truth, p) in enumerate([(1, p) for p in POS] + [(0, p) for p in NEG]):
        uid = f"1.2.3.{i + 1}"
        # cardiomegaly: same scores mirrored; its reference is missing on the last image
        cardio = None if i == 11 else truth
        images.append(LabelledImage(Path(f"/nowhere/{i}.dcm"), uid, f"1.2.9.{i // 2}",
                                    {"nodule": truth, "cardiomegaly": cardio}, f"P{i // 4}"))  # fmt: skip
        scores[uid] = {"nodule": p, "cardiomegaly": 1 - p, "pneumothorax": 0.5}
    labelled = LabelledSet(images, ["nodule", "cardiomegaly"], {"images_without_labels": 0})
    return labelled, StubAnalyzer(scores, {"nodule": 0.5, "cardiomegaly": 0.5,
                                           "pneumothorax": 0.5})  # fmt: skip


def _reader(image: LabelledImage) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID, ds.Modality, ds.ViewPosition = image.sop_instance_uid, "DX", "PA"
    return ds


def _wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_hand_computed_figures_through_a_stub_analyzer() -> None:
    labelled, stub = _stub_set()
    found = predict(stub, labelled.images, batch_size=5, reader=_reader)
    assert stub.calls == [5, 5, 2]
    report = evaluate_predictions(found, labelled, n_boot=500)
    (model,) = report.models
    nodule = {m.label: m for m in model.labels}["nodule"]
    # at 0.5: TP .95 .85 .75 .55 = 4, FN .45 .30 = 2, FP .80 = 1, TN = 5
    cm = nodule.operating_point.confusion
    assert (cm.tp, cm.fp, cm.tn, cm.fn) == (4, 1, 5, 2)
    op = nodule.operating_point
    assert op.sensitivity.value == pytest.approx(4 / 6)
    assert op.specificity.value == pytest.approx(5 / 6)
    assert op.ppv.value == pytest.approx(4 / 5)
    assert op.npv.value == pytest.approx(5 / 7)
    assert op.f1.value == pytest.approx(8 / 11)  # 2TP / (2TP + FP + FN)
    assert (op.sensitivity.lower, op.sensitivity.upper) == pytest.approx(_wilson(4, 6))
    assert (op.specificity.lower, op.specificity.upper) == pytest.approx(_wilson(5, 6))
    # AUROC: pairs won per positive 6 + 6 + 5 + 5 + 5 + 3 = 30 of 36
    assert nodule.auroc.value == pytest.approx(30 / 36)
    assert nodule.auroc.lower < nodule.auroc.value <= nodule.auroc.upper
    # AP: precision at each positive's rank 1/1 2/2 3/4 4/5 5/6 6/9, recall steps of 1/6
    assert nodule.average_precision.value == pytest.approx((1 + 1 + 0.75 + 0.8 + 5 / 6 + 6 / 9) / 6)
    assert (nodule.n, nodule.n_pos, nodule.n_neg, nodule.threshold) == (12, 6, 6, 0.5)


def test_missing_reference_values_and_labels_are_reported() -> None:
    labelled, stub = _stub_set()
    report = evaluate_predictions(predict(stub, labelled.images, reader=_reader), labelled,
                                  n_boot=200)  # fmt: skip
    (model,) = report.models
    cardio = {m.label: m for m in model.labels}["cardiomegaly"]
    assert (cardio.n, cardio.n_pos, cardio.n_neg) == (11, 6, 5)  # one image not assessed
    assert "pneumothorax" in model.not_evaluated  # the model has it, the labels do not
    doc = report.as_dict()
    assert doc["models"][0]["metrics"]["nodule"]["tp"] == 4
    assert doc["data"]["patients"] == 3 and doc["data"]["studies"] == 6
    text = markdown_report(report)
    assert "| nodule | 12 | 6 | 0.667 [" in text
    assert "AUROC [95% CI]" in text and "pneumothorax" in text


def test_undecodable_image_is_skipped_not_fatal() -> None:
    from ai.types import PixelDataError

    labelled, stub = _stub_set()
    bad = labelled.images[3].sop_instance_uid
    inner = stub.analyze

    def analyze(datasets: list[Dataset]) -> list[ImageResult]:
        if any(str(ds.SOPInstanceUID) == bad for ds in datasets):
            raise PixelDataError(f"SOP Instance {bad}: cannot decode")
        return inner(datasets)

    stub.analyze = analyze  # type: ignore[method-assign]
    found = predict(stub, labelled.images, batch_size=4, reader=_reader)
    assert found.images == 11 and found.skipped == {"undecodable pixel data": 1}


def test_report_files_from_the_stub(tmp_path: Path) -> None:
    labelled, stub = _stub_set()
    report = evaluate_predictions(predict(stub, labelled.images, reader=_reader), labelled,
                                  n_boot=200)  # fmt: skip
    files = write_evaluation(tmp_path, report)
    names = sorted(p.name for p in files["curves"])
    assert names == ["pr_cardiomegaly.png", "pr_nodule.png", "roc_cardiomegaly.png",
                     "roc_nodule.png"]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files["curves"])
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["models"][0]["metrics"]["nodule"]["npv"]["value"] == pytest.approx(5 / 7)
    assert doc["models"][0]["metrics"]["nodule"]["average_precision"]["value"] > 0.8


# --------------------------------------------------------------------------------------------
# The real path: phantoms -> node Analyzer -> report


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_phantoms")
    synthesize(out, 7, seed=11, size=(192, 160), prevalence=0.5)
    return out


@pytest.fixture(scope="module")
def evaluated(phantoms: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_report")
    code = main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--out", str(out), "--device", "cpu",
                 "--bootstrap", "200", "--batch-size", "3"])  # fmt: skip
    assert code == 0
    return out


def test_cli_writes_every_file(evaluated: Path, phantoms: Path) -> None:
    doc = json.loads((evaluated / "metrics.json").read_text())
    (model,) = doc["models"]
    assert model["model"]["name"] == "tiny-test-classifier" and model["model"]["device_uid"]
    assert model["model"]["weights_sha256"]
    with (phantoms / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert doc["data"]["labelled_images"] == len(rows)
    assert doc["data"]["evaluated_images"] == len(rows)
    for label in ("nodule", "cardiomegaly", "pneumothorax"):
        m = model["metrics"][label]
        assert m["images"] == len(rows)
        assert m["n_pos"] == sum(int(r[label]) for r in rows)
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == len(rows)
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "average_precision"):
            assert set(m[key]) == {"value", "lower", "upper"}
    # the tiny bundle's thresholds: nodule 0.0 (always positive), pneumothorax 1.0 (never)
    assert model["metrics"]["nodule"]["fn"] == 0 and model["metrics"]["nodule"]["tn"] == 0
    assert model["metrics"]["pneumothorax"]["tp"] == 0
    report = (evaluated / "report.md").read_text()
    assert (
        "| Label | Images | Positives | Sens [95% CI] | Spec [95% CI] | PPV | NPV | F1 |" in report
    )
    assert "DEMO" in report
    curves = sorted(p.name for p in (evaluated / "curves").rglob("*.png"))
    assert "roc_nodule.png" in curves and "pr_nodule.png" in curves


def test_evaluate_gives_the_node_predictions(evaluated: Path, phantoms: Path,
                                             tiny_bundle: Path) -> None:  # fmt: skip
    """predictions.csv equals a direct run of the node's Analyzer, study by study, with its
    default settings (Grad-CAM on), on the same files."""
    with (evaluated / "predictions.csv").open() as fh:
        written = {(r["sop_instance_uid"], r["label"]): r for r in csv.DictReader(fh)}
    by_study: dict[str, list[Dataset]] = defaultdict(list)
    for path in sorted(phantoms.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        by_study[str(ds.StudyInstanceUID)].append(ds)
    node = Analyzer([tiny_bundle], device="cpu")
    compared = 0
    for datasets in by_study.values():
        for result in node.analyze(datasets):
            for f in result.findings:
                row = written[(result.sop_instance_uid, f.label)]
                assert float(row["probability"]) == pytest.approx(f.probability, abs=1e-6)
                assert row["positive"] == str(int(f.positive))
                assert float(row["threshold"]) == f.threshold
                assert row["device_uid"] == f.model.device_uid
                compared += 1
    assert compared == len(written) > 0


def test_localisation_figures_from_the_locations_sidecar(evaluated: Path, phantoms: Path,
                                                         tiny_bundle: Path) -> None:
    """synth's locations.json beside labels.csv turns on Grad-CAM: the tiny bundle calls
    every image nodule-positive (threshold 0), so each nodule-positive phantom is a true
    positive; its hit is recomputed here from boxes.json and the node's own map."""
    doc = json.loads((evaluated / "metrics.json").read_text())
    (model,) = doc["models"]
    assert doc["data"]["locations_file"] == "locations.json"
    with (phantoms / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["nodule"] == "1"]
    nodule = model["localisation"]["nodule"]
    assert nodule["tp_images"] == len(rows) > 0
    assert "pneumothorax" not in model["localisation"]  # threshold 1.0: no true positive
    assert 0.0 <= nodule["lung_energy"] <= 1.0
    assert set(nodule["hit_rate"]) == {"value", "lower", "upper"}
    boxes = json.loads((phantoms / "boxes.json").read_text())
    node = Analyzer([tiny_bundle], device="cpu", finding_maps=True)
    hits = 0
    for row in rows:
        (result,) = node.analyze([pydicom.dcmread(phantoms / row["path"])])
        heat = result.finding_heatmaps[(result.findings[0].model.device_uid, "nodule")]
        r, c = divmod(int(heat.argmax()), heat.shape[1])
        tol = 15.0 * max(heat.shape) / 224
        for line in boxes[row["path"]]:
            k, xc, yc, w, h = (float(v) for v in line.split())
            if int(k) == 0:  # class 0 is nodule (classes.txt)
                dx = max((xc - w / 2) * heat.shape[1] - c - 0.5, 0, c + 0.5 - (xc + w / 2) * heat.shape[1])
                dy = max((yc - h / 2) * heat.shape[0] - r - 0.5, 0, r + 0.5 - (yc + h / 2) * heat.shape[0])
                hits += math.hypot(dx, dy) <= tol
    assert nodule["hits"] == hits
    report = (evaluated / "report.md").read_text()
    assert "| Label | TP images | Pointing-game hit rate [95% CI] | Grad-CAM energy in lungs |" in report


def test_labels_keyed_by_study_and_path(phantoms: Path, tmp_path: Path) -> None:
    with (phantoms / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for key in ("path", "study_instance_uid"):
        target = tmp_path / f"by_{key}.csv"
        seen, kept = set(), []
        for r in rows:
            if r[key] not in seen:
                seen.add(r[key])
                kept.append({key: r[key], "nodule": r["nodule"]})
        with target.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[key, "nodule"])
            writer.writeheader()
            writer.writerows(kept)
        labelled = load_labelled_set(phantoms, target)
        assert len(labelled.images) == len(rows)
        assert labelled.label_names == ["nodule"]


def test_cli_errors_are_one_line(tmp_path: Path, tiny_bundle: Path, phantoms: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = tmp_path / "labels.csv"
    bad.write_text("sop_instance_uid,nodule\n1.2.3,maybe\n")
    code = main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(phantoms),
                 "--labels", str(bad), "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and 'has value "maybe"' in err and "Traceback" not in err
    code = main(["-q", "evaluate", "--bundle", str(tmp_path / "nope"), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "missing configs/metadata.json" in err and "Traceback" not in err
    code = main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--out", str(tmp_path / "r"),
                 "--device", "bogus"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and 'device "bogus" is not a valid torch device' in err


def test_nothing_analysable_is_an_error() -> None:
    labelled, stub = _stub_set()

    def lateral(image: LabelledImage) -> Dataset:
        ds = _reader(image)
        ds.ViewPosition = "LL"
        return ds

    found = predict(stub, labelled.images, reader=lateral)
    assert found.skipped == {"lateral view": 12}
    with pytest.raises(EvaluateError, match="no image could be analysed"):
        evaluate_predictions(found, labelled)
