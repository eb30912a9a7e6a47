"""``training fit --task detection`` learns: nodule AP50 on held-out patients.

About 290 phantom radiographs (240 studies, 256 px, every analysable DICOM variant, each
finding with prevalence 0.5, so about half the images are nodule-negative and train the
detector through hard negatives) go through the node's preprocessing at 256 px into a
RetinaNet on a half-width ResNet-10 (32-channel FPN, two-convolution heads) for 8 epochs
(184 AdamW steps of 8 whole images) on one CPU thread: the machine is shared, and two
threads ran 10x slower whenever another process held one of the two cores. The assertion
is on the held-out test patients, with the figures the run itself wrote; the bundle is then
run by the node's Analyzer on the same test images and must give the same AP50.

While tuning (synth/fit seeds 1-4, two threads): test nodule AP50 0.89-1.00 in 45-55 s of
fitting; seed 4 on one thread with the other core busy: 0.96 in 74 s. Training on 128 px
crops was cheaper per step but reached only 0.57-0.86 in the same time, hence whole images.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from ai.bundle.gate import GATE_PATH
from ai.bundle.load import load_bundle
from ai.inference import Analyzer
from ai.reference.metrics_detection import evaluate_boxes, findings_to_boxes, yolo_truth
from training.cli import main

NETWORK = {"backbone": "resnet10", "widen_factor": 0.5, "fpn_channels": 32, "head_convs": 2}
SEED = 4  # the hardest of the seeds tried


@pytest.mark.slow
def test_detector_reaches_nodule_ap50_on_held_out_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    started = time.monotonic()
    assert main(["-q", "synth", "--out", str(data), "--count", "240", "--seed", str(SEED),
                 "--size", "256", "--prevalence", "0.5"]) == 0  # fmt: skip
    synth_s = time.monotonic() - started
    assert main(["-q", "fit", "--task", "detection", "--data", str(data),
                 "--labels", str(data / "boxes.json"), "--label-names", "nodule",
                 "--out", str(out), "--network-args", json.dumps(NETWORK),
                 "--image-size", "256", "--epochs", "8", "--batch-size", "8",
                 "--split", "0.6,0.2,0.2", "--patience", "0", "--threads", "1",
                 "--seed", str(SEED)]) == 0  # fmt: skip
    fit_s = time.monotonic() - started - synth_s
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["per_label"]["nodule"]["test"]
    with capsys.disabled():
        print(f"\ndetection learning test: synth {synth_s:.0f} s, fit {fit_s:.0f} s, "
              f"{metrics['history'][-1]['step']} steps; nodule test AP50 {test['map50']:.3f} "
              f"AP50-95 {test['map50_95']:.3f} P {test['precision']:.3f} R {test['recall']:.3f} "
              f"({test['instances']} nodules in {test['images']} test images; FROC CPM "
              f"{test['froc']['cpm']:.3f})")  # fmt: skip
    assert test["instances"] >= 20
    assert test["map50"] >= 0.5, f"nodule AP50 on held-out patients: {test}"
    assert test["recall"] >= 0.5 and test["precision"] >= 0.5
    bundle = load_bundle(out / "bundle").metadata
    assert bundle.validation_metrics["ap50"]["nodule"] >= 0.5
    _node_gives_the_same_ap50(data, out, test["map50"], bundle.labels[0].threshold)


def _without_gate(bundle: Path, copy: Path) -> Path:
    shutil.copytree(bundle, copy)
    meta_path = copy / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("ood"), "training fit fits a gate"
    meta_path.write_text(json.dumps(meta))
    (copy / GATE_PATH).unlink()
    return copy


def _node_gives_the_same_ap50(data: Path, out: Path, fit_ap50: float, threshold: float) -> None:
    """The bundle in the node's Analyzer on the test images: the AP50 the run wrote."""
    split = json.loads((out / "split.json").read_text())["sop_instance_uids"]["test"]
    with (data / "labels.csv").open(newline="") as fh:
        paths = {r["sop_instance_uid"]: r["path"] for r in csv.DictReader(fh)}
    datasets = [pydicom.dcmread(data / paths[sop]) for sop in split]
    # the fit's figure is over every test image; the node's gate would withhold the few
    # beyond its quantile (they have no boxes then), so compare the bundle without its gate
    bundle = _without_gate(out / "bundle", out / "bundle-ungated")
    results = Analyzer([bundle], device="cpu", batch_size=8).analyze(datasets)
    assert not any(r.ood for r in results)
    images = [(paths[sop], r.rows, r.columns) for sop, r in zip(split, results, strict=True)]
    truths, _ = yolo_truth(json.loads((data / "boxes.json").read_text()), images, ["nodule"],
                           (data / "classes.txt").read_text().split())  # fmt: skip
    preds = [findings_to_boxes(r.findings, ["nodule"]) for r in results]
    refs = [t for t in truths if t is not None]
    assert len(refs) == len(preds)
    node = evaluate_boxes(preds, refs, ["nodule"], [threshold]).classes[0]
    assert node.ap50 == pytest.approx(fit_ap50, abs=1e-6)
    assert all(f.positive == (f.probability >= threshold) for r in results for f in r.findings)
