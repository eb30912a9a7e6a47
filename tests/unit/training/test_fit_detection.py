"""``training fit --task detection``: box data, augmentation, run folder, resume, evaluate.

The runs here are plumbing-sized (a quarter-width ResNet-10 on 64 px inputs, a handful
of steps); that the detector actually learns is ``test_fit_detection_learning.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.bundle.load import load_bundle
from ai.pixels import Letterbox
from training.cli import main
from training.errors import FitError
from training.fit import checkpoint
from training.fit.detection import (
    DetectionDataset,
    DetectionFitConfig,
    affine_jitter,
    fit_detection,
    prepare_data,
    random_crop,
)
from training.synth import synthesize

NET = {"backbone": "resnet10", "widen_factor": 0.25, "fpn_channels": 16, "head_convs": 1,
       "anchor_sizes": [4, 8]}  # fmt: skip
FAST = ["--network-args", json.dumps(NET), "--image-size", "64", "--batch-size", "4",
        "--threads", "1", "--split", "0.5,0.25,0.25", "--label-names", "nodule"]  # fmt: skip


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("det-data")
    synthesize(out, 16, seed=3, size=(96, 80), variants=["dx_mono2_explicit", "cr_mono1_voi_lut_seq"],
               prevalence=0.5)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def run_dir(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("det-run") / "run"
    code = main(["-q", "fit", "--task", "detection", "--data", str(phantoms), "--labels",
                 str(phantoms / "boxes.json"), "--out", str(out), "--epochs", "2", *FAST])  # fmt: skip
    assert code == 0
    return out


def _config(phantoms: Path, out: Path, **kw: object) -> DetectionFitConfig:
    base = {"data": phantoms, "labels": phantoms / "boxes.json", "out": out, "network_args": NET,
            "image_size": 64, "batch_size": 4, "threads": 1, "split": (0.5, 0.25, 0.25),
            "label_names": ("nodule",), "progress": False}  # fmt: skip
    return DetectionFitConfig(**{**base, **kw})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Data


def test_yolo_boxes_go_to_model_space_through_the_letterbox(phantoms: Path, tmp_path: Path) -> None:
    data, split = prepare_data(_config(phantoms, tmp_path / "r"), resume=False, progress=False)
    doc = json.loads((phantoms / "boxes.json").read_text())
    nodules = sum(1 for lines in doc.values() for line in lines if line.startswith("0 "))
    others = sum(1 for lines in doc.values() for line in lines if not line.startswith("0 "))
    assert data.label_names == ("nodule",) and len(data.items) == len(doc)
    assert sum(len(b) for b in data.boxes) == nodules
    assert data.summary["boxes_of_other_classes_ignored"] == others
    negatives = sum(data.summary["splits"][s]["negative_images"] for s in ("train", "val", "test"))
    assert negatives == sum(1 for lines in doc.values() if not any(x.startswith("0 ") for x in lines))
    assert negatives > 0  # negative images stay in the data set
    by_sop = {item.sop_instance_uid: i for i, item in enumerate(data.items)}
    rel, lines = next((k, v) for k, v in doc.items() if any(x.startswith("0 ") for x in v))
    import pydicom

    ds = pydicom.dcmread(phantoms / rel, stop_before_pixels=True)
    _, xc, yc, w, h = (float(v) for v in next(x for x in lines if x.startswith("0 ")).split())
    box = Letterbox(96, 80, 64)
    x0, y0 = box.to_model((xc - w / 2) * 80, (yc - h / 2) * 96)
    assert data.boxes[by_sop[ds.SOPInstanceUID]][0, :2] == pytest.approx([x0, y0], abs=1e-4)
    assert set(split.sop_uids) == {"train", "val", "test"}


def test_nih_csv_with_unlabelled_images_as_negatives(phantoms: Path, tmp_path: Path) -> None:
    import pydicom

    doc = json.loads((phantoms / "boxes.json").read_text())
    rows = []
    for rel, lines in doc.items():
        for line in lines:
            if line.startswith("0 "):
                _, xc, yc, w, h = (float(v) for v in line.split())
                ds = pydicom.dcmread(phantoms / rel, stop_before_pixels=True)
                rows.append([Path(rel).name, "Nodule", (xc - w / 2) * ds.Columns,
                             (yc - h / 2) * ds.Rows, w * ds.Columns, h * ds.Rows])  # fmt: skip
    nih = tmp_path / "BBox_List.csv"
    with nih.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        writer.writerows(rows)
    config = _config(phantoms, tmp_path / "r", labels=nih, label_names=("nodule",),
                     unlabelled_as_negative=True)  # fmt: skip
    data, _ = prepare_data(config, resume=False, progress=False)
    assert len(data.items) == len(doc)
    assert sum(len(b) for b in data.boxes) == len(rows)
    assert data.summary["unlabelled_as_negative"] == len(doc) - len({r[0] for r in rows})


def _square(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros((size, size), np.float32)
    image[box[1] : box[3], box[0] : box[2]] = 1.0
    return image


def _bright_box(image: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(image > 0.5)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("seed", range(5))
def test_augmentation_moves_boxes_with_the_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    box = (40, 50, 60, 66)
    boxes = np.array([[*box, 0]], np.float32)
    image, moved = affine_jitter(_square(128, box), boxes, rng)
    assert moved.shape == (1, 5) and moved[0, 4] == 0
    assert _bright_box(image) == pytest.approx(moved[0, :4].tolist(), abs=1.0)
    crop, kept = random_crop(image, moved, 64, rng, positive_fraction=1.0)
    assert crop.shape == (64, 64) and len(kept) == 1
    assert _bright_box(crop) == pytest.approx(kept[0, :4].tolist(), abs=1.0)


def test_crops_drop_boxes_that_leave_the_crop() -> None:
    boxes = np.array([[0, 0, 10, 10, 0], [100, 100, 120, 120, 0]], np.float32)
    seen = set()
    for seed in range(20):
        _, kept = random_crop(np.zeros((128, 128), np.float32), boxes, 64,
                              np.random.default_rng(seed), positive_fraction=0.0)  # fmt: skip
        assert all(((b[2] - b[0]) * (b[3] - b[1])) >= 50 for b in kept)
        seen.add(len(kept))
    assert 0 in seen


def test_dataset_items_are_seeded_by_epoch(phantoms: Path, tmp_path: Path) -> None:
    from training.datasets import ImageCache

    config = _config(phantoms, tmp_path / "r")
    data, _ = prepare_data(config, resume=False, progress=False)
    ds = DetectionDataset(data.subset("train"), data, ImageCache(config.preprocess, None),
                          augment=True, crop=32, seed=1)  # fmt: skip
    a, b, c = ds[(0, 0)], ds[(0, 0)], ds[(0, 1)]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 32, 32) and a["boxes"].shape[1] == 4


# --------------------------------------------------------------------------------------------
# Runs


def test_run_folder_metrics_and_bundle(run_dir: Path) -> None:
    for name in ("run_config.json", "split.json", "data_report.txt", "last.pt", "best.pt",
                 "metrics.json", "detections.csv", "tensorboard", "bundle"):  # fmt: skip
        assert (run_dir / name).exists(), name
    record = json.loads((run_dir / "run_config.json").read_text())
    assert record["args"]["task"] == "detection" and record["results"]["steps"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["per_label"]["nodule"]
    assert {"threshold", "threshold_method", "val", "test"} <= set(entry)
    assert {"map50", "map50_95", "precision", "recall", "froc"} <= set(entry["test"])
    assert len(metrics["history"]) == 2
    bundle = load_bundle(run_dir / "bundle")
    meta = bundle.metadata
    assert meta.task == "detection" and meta.label_names == ["nodule"]
    assert meta.labels[0].threshold == pytest.approx(entry["threshold"])
    assert meta.labels[0].code.value == "27925004"
    assert "nodule" in meta.validation_metrics["ap50"]
    assert meta.network.args["backbone"] == "resnet10" and meta.input.size == 64


def test_resume_continues_the_same_run(phantoms: Path, tmp_path: Path) -> None:
    whole = fit_detection(_config(phantoms, tmp_path / "whole", epochs=2, augment=True))
    stopped: list[int] = []

    def stop(record: dict) -> None:
        stopped.append(record["epoch"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_detection(_config(phantoms, tmp_path / "split", epochs=2), on_epoch_end=stop)
    assert stopped == [1] and (tmp_path / "split" / "last.pt").is_file()
    code = main(["-q", "fit", "--resume", str(tmp_path / "split"), "--threads", "1"])
    assert code == 0
    resumed = checkpoint.load(tmp_path / "split" / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (2, whole.state.step)
    assert json.loads(resumed["history"])[0]["val_map50"] == whole.state.history[0]["val_map50"]
    a = load_bundle(tmp_path / "whole" / "bundle").model.state_dict()
    b = load_bundle(tmp_path / "split" / "bundle").model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_cli_refuses_mixed_options(phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-q", "fit", "--data", str(phantoms), "--labels", str(phantoms / "boxes.json"),
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main([*args, "--task", "detection", "--loss", "focal"]) == 2
    assert "--loss do not apply to --task detection" in capsys.readouterr().err
    assert main([*args, "--train-crop", "32"]) == 2
    assert "--train-crop need --task detection" in capsys.readouterr().err
    assert main([*args, "--task", "detection", "--label-names", "mass", *FAST[:-2]]) == 1
    assert "are not classes of boxes.json" in capsys.readouterr().err
    with pytest.raises(FitError, match="must be a multiple of 16"):
        _config(phantoms, tmp_path / "x", image_size=72)


def test_training_evaluate_writes_detection_table_and_froc(
    run_dir: Path, phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    code = main(["-q", "evaluate", "--bundle", str(run_dir / "bundle"), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--boxes", str(phantoms / "boxes.json"),
                 "--out", str(out), "--bootstrap", "50"])  # fmt: skip
    assert code == 0
    assert "| Class | Images | Instances | P | R | mAP50 | mAP50-95 |" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    (model,) = metrics["models"]
    rows = {r["class"]: r for r in model["detection"]["classes"]}
    doc = json.loads((phantoms / "boxes.json").read_text())
    nodules = sum(1 for lines in doc.values() for line in lines if line.startswith("0 "))
    assert rows["nodule"]["instances"] == nodules and rows["all"]["images"] == len(doc)
    assert model["detection"]["notes"]["boxes_of_other_classes"] > 0  # classes.txt was read
    assert "| nodule |" in (out / "report.md").read_text()
    (froc,) = out.glob("curves/*/froc_nodule.png")
    assert froc.stat().st_size > 1000
    assert len(model["detection"]["froc"]["nodule"]["sensitivity"]) == 7


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(phantoms: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "training", "-q", "fit",
           "--task", "detection", "--data", str(phantoms), "--labels", str(phantoms / "boxes.json"),
           "--out", str(out), "--epochs", "1", "--batch-size", "2",
           *[a for a in FAST if a not in ("--batch-size", "4")]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run_config.json").read_text())
    assert record["results"]["world_size"] == 2
    assert load_bundle(out / "bundle").metadata.training["world_size"] == 2
    assert proc.stdout.count("bundle:") == 1, "only rank 0 reports"
