"""The ChestX-ray14 path: the real NIH label file, its patient-level split, and ``training
fit`` end to end on phantoms written in exactly the NIH layout (PNG + CSV).

The real label file (``/work/shared/nih-cxr14``, see its README) has no images; the
learning test renders phantom radiographs (:func:`training.phantoms.render_phantom`) as
8-bit PNGs named and labelled as NIH names and labels them.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ai.bundle.load import load_bundle
from ai.networks import build_network
from tests.helpers.torchvision_densenet import RefDenseNet121, old_style
from training.cli import main
from training.errors import FitError
from training.fit import checkpoint
from training.fit.optimisation import make_optimisation
from training.losses import ClassificationLoss
from training.nih import (
    CHEXNET_AUROC,
    NIH_LABELS,
    chexnet_table,
    find_images,
    read_labels,
    read_split_lists,
    split_records,
    targets,
)
from training.phantoms import render_phantom
from training.split import prevalence

REAL = Path(__file__).resolve().parents[3].parent / "shared" / "nih-cxr14" / "Data_Entry_2017_v2020.csv.gz"
HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
          "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
          "OriginalImagePixelSpacing[x", "y]"]  # the real file's header, split at its commas
PHANTOM_FINDINGS = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion"}


def _real_file() -> Path:
    for candidate in (REAL, Path("/work/shared/nih-cxr14/Data_Entry_2017_v2020.csv.gz")):
        if candidate.is_file():
            return candidate
    pytest.skip("the NIH label file is not in ../shared/nih-cxr14")


def test_real_label_file_parses_and_splits_by_patient() -> None:
    records = read_labels(_real_file())
    assert len(records) == 112_120
    assert len({r.patient for r in records}) == 30_805
    assert {r.view for r in records} == {"PA", "AP"}
    assert set().union(*(r.findings for r in records)) == set(NIH_LABELS)  # "No Finding" dropped
    y = targets(records, NIH_LABELS)
    assert int((y.sum(axis=1) == 0).sum()) == 60_361  # the "No Finding" rows
    split = split_records(records, y, fractions=(0.7, 0.1, 0.2), seed=0, label_names=NIH_LABELS)
    split_of = {uid: name for name, uids in split.sop_uids.items() for uid in uids}
    patients_per_split: dict[str, set[str]] = {name: set() for name in split.sop_uids}
    for r in records:
        patients_per_split[split_of[r.image]].add(r.patient)
    train, val, test = (patients_per_split[s] for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 30_805
    assert sum(len(u) for u in split.sop_uids.values()) == 112_120
    share = {name: len(uids) / 112_120 for name, uids in split.sop_uids.items()}
    assert share == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=0.01)
    figures = prevalence(split)
    for label in NIH_LABELS:
        values = [figures[s][label] for s in ("train", "val", "test")]
        assert max(values) - min(values) < 0.01, (label, values)


def test_official_split_lists_keep_test_exactly(tmp_path: Path) -> None:
    records = read_labels(_real_file())[:3000]
    patients = sorted({r.patient for r in records})
    test_patients = set(patients[: len(patients) // 5])
    (tmp_path / "test_list.txt").write_text(
        "\n".join(r.image for r in records if r.patient in test_patients) + "\n")
    (tmp_path / "train_val_list.txt").write_text(
        "\n".join(r.image for r in records if r.patient not in test_patients) + "\n")
    lists = read_split_lists(tmp_path)
    split = split_records(records, targets(records, NIH_LABELS), fractions=(0.7, 0.1, 0.2),
                          seed=0, label_names=NIH_LABELS, lists=lists)  # fmt: skip
    assert set(split.sop_uids["test"]) == lists[1]
    assert set(split.sop_uids["train"]) | set(split.sop_uids["val"]) == lists[0]
    assert split.sop_uids["val"] and not set(split.sop_uids["train"]) & set(split.sop_uids["val"])
    (tmp_path / "test_list.txt").write_text(records[0].image + "\n" + "\n".join(lists[0]))
    with pytest.raises(FitError, match="in both lists"):
        read_split_lists(tmp_path)


def test_bad_label_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("Image Index,Finding Labels\n00000001_000.png,Cardiomegaly\n")
    with pytest.raises(FitError, match=r"missing columns \['Patient ID', 'View Position'\]"):
        read_labels(path)


def test_chexnet_table_layout() -> None:
    per_label = {"Cardiomegaly": {"test": {"auroc": {"value": 0.9, "lower": 0.85, "upper": 0.95}}},
                 "Effusion": {"test": {"auroc": {"value": None}}}}  # fmt: skip
    table = chexnet_table(per_label).splitlines()
    assert table[0].startswith("| Pathology | This run (test) | 95 % CI | CheXNet (published)")
    assert "| Cardiomegaly | 0.9000 | 0.8500-0.9500 | 0.9248 | -0.0248 |" in table
    assert f"| Effusion | n/a | — | {CHEXNET_AUROC['Effusion']:.4f} | — |" in table
    assert table[-1].startswith("| **Mean (1 labels)** | 0.9000")


# --------------------------------------------------------------------------------------------
# Learning on phantoms in the NIH layout


def write_nih_phantoms(root: Path, patients: int, seed: int) -> Path:
    """``images_001/images/<patient>_<follow-up>.png`` + ``Data_Entry_2017.csv`` (the real
    header and value formats); 1-3 follow-ups per patient, findings kept across follow-ups
    half of the time, a few PA/AP views. Returns the CSV."""
    rng = np.random.default_rng(seed)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    rows = []
    for patient in range(1, patients + 1):
        base = {k: bool(rng.random() < 0.4) for k in PHANTOM_FINDINGS}
        for follow_up in range(int(rng.integers(1, 4))):
            found = base if rng.random() < 0.5 else {k: bool(rng.random() < 0.4) for k in base}
            view = "PA" if rng.random() < 0.7 else "AP"
            phantom = render_phantom(int(rng.integers(1 << 30)), 96, 80, view=view, findings=found)
            name = f"{patient:08d}_{follow_up:03d}.png"
            cv2.imwrite(str(folder / name), np.round(phantom.image * 255).astype(np.uint8))
            labels = "|".join(PHANTOM_FINDINGS[k] for k, v in found.items() if v) or "No Finding"
            rows.append([name, labels, follow_up, patient, int(rng.integers(20, 90)),
                         "M" if rng.random() < 0.5 else "F", view, 80, 96, 0.143, 0.143])  # fmt: skip
    path = root / "Data_Entry_2017.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER[:7] + ["OriginalImage[Width,Height]", "OriginalImagePixelSpacing[x,y]"])
        writer.writerows(rows)
    return path


def test_fit_learns_from_nih_layout_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    data, out = tmp_path / "nih", tmp_path / "run"
    labels = write_nih_phantoms(data, patients=80, seed=3)
    code = main(["-q", "fit", "--preset", "chexnet", "--data", str(data), "--labels", str(labels),
                 "--out", str(out), "--label-names", "Cardiomegaly,Effusion",
                 "--network", "densenet", "--network-args",
                 json.dumps({"init_features": 8, "growth_rate": 8, "block_config": [2, 2, 2]}),
                 "--image-size", "64", "--epochs", "20", "--lr", "3e-3", "--patience", "0",
                 "--threads", "1", "--seed", "2"])  # fmt: skip
    stdout = capsys.readouterr().out
    seconds = time.monotonic() - started
    assert code == 0, stdout
    record = json.loads((out / "run_config.json").read_text())
    args = record["args"]
    assert (args["preset"], args["optimizer"], args["schedule"], args["loss"]) == (
        "chexnet", "adam", "plateau", "weighted-bce")
    assert args["batch_size"] == 16 and args["lr"] == 3e-3  # preset, and an explicit override
    assert record["data"]["layout"] == "nih-chestxray14" and record["data"]["match"]["missing_file"] == 0
    split = json.loads((out / "split.json").read_text())
    owners: dict[str, str] = {}
    for name, uids in split["sop_instance_uids"].items():
        for uid in uids:
            assert owners.setdefault(uid.split("_")[0], name) == name  # patient in one split
    table = (out / "chexnet_table.md").read_text()
    assert "| Cardiomegaly |" in table and "0.9248" in table and "| Effusion |" in table
    assert "CheXNet (published)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    aurocs = {n: e["test"]["auroc"]["value"] for n, e in metrics["per_label"].items()}
    with capsys.disabled():
        print(f"\nNIH-layout learning test: {seconds:.0f} s, test AUROC {aurocs}")
    assert max(aurocs.values()) >= 0.8, table  # learnt, not only run
    bundle = load_bundle(out / "bundle").metadata
    assert bundle.label_names == ["Cardiomegaly", "Effusion"]
    assert bundle.labels[1].code.value == "60046008"  # Effusion: SNOMED pleural effusion
    assert bundle.training["optimizer"] == "Adam" and bundle.training["preset"] == "chexnet"


# --------------------------------------------------------------------------------------------
# The preset's parts


def test_weighted_bce_is_chexnets_loss() -> None:
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [0.1, 1.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    fraction = torch.tensor([0.2, 0.05])  # |P| / (|P| + |N|) on the training split
    p = torch.sigmoid(logits)
    w_pos, w_neg = 1 - fraction, fraction
    expected = -(w_pos * y * torch.log(p) + w_neg * (1 - y) * torch.log(1 - p)).mean()
    got = ClassificationLoss(True, "weighted-bce", positive_fraction=fraction)(logits, y)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="weighted-bce needs"):
        ClassificationLoss(False, "weighted-bce", positive_fraction=fraction)


def test_plateau_schedule_divides_lr_by_ten_and_resumes() -> None:
    model = torch.nn.Linear(3, 2)
    opt = make_optimisation(model, torch.device("cpu"), lr=1e-3, weight_decay=0.0, total_steps=10,
                            warmup_steps=0, min_lr_ratio=0.0, amp=False, clip_grad=0.0,
                            optimizer="adam", schedule="plateau")  # fmt: skip
    assert isinstance(opt.optimizer, torch.optim.Adam)
    assert opt.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.plateau is not None
    assert not opt.plateau.update(0.5)  # first epoch: the best so far
    assert opt.plateau.update(0.6)  # no improvement: LR / 10
    opt.optimizer.step()
    opt.scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    again = make_optimisation(model, torch.device("cpu"), lr=1e-3, weight_decay=0.0,
                              total_steps=10, warmup_steps=0, min_lr_ratio=0.0, amp=False,
                              clip_grad=0.0, optimizer="adam", schedule="plateau")  # fmt: skip
    again.load_state_dict(opt.state_dict())  # a resumed run keeps its reduced LR
    again.optimizer.step()
    again.scheduler.step()
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert again.plateau is not None and again.plateau.reductions == 1


def test_pretrained_accepts_torchvision_densenet_names(tmp_path: Path) -> None:
    """CheXNet starts from torchvision's ImageNet DenseNet121: its names (old style, as in
    densenet121-a639ec97.pth) load into MONAI's; the 1000-class head is skipped."""
    reference = RefDenseNet121(3, 1000)
    torch.save({old_style(k): v for k, v in reference.state_dict().items()
                if not k.endswith("num_batches_tracked")}, tmp_path / "imagenet.pth")  # fmt: skip
    model = build_network("densenet121", num_classes=14).module
    report = checkpoint.load_pretrained(model, tmp_path / "imagenet.pth")
    assert report["unexpected"] == []
    assert {m.split(":")[0] for m in report["shape_mismatch"]} == {
        "class_layers.out.weight", "class_layers.out.bias"}
    conv2 = "features.denseblock4.denselayer16.layers.conv2.weight"
    assert torch.equal(model.state_dict()[conv2],
                       reference.state_dict()["features.denseblock4.denselayer16.conv2.weight"])


def test_images_are_found_by_name_or_as_dicom_with_the_same_stem(tmp_path: Path) -> None:
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    png = tmp_path / "images_002" / "images" / "00000002_000.png"
    png.write_bytes(b"")
    dcm = tmp_path / "converted" / "00000003_001.dcm"
    dcm.parent.mkdir()
    dcm.write_bytes(b"")
    (tmp_path / "00000004_000.txt").write_bytes(b"")
    found = find_images(tmp_path, ["00000002_000.png", "00000003_001.png", "00000004_000.png"])
    assert found == {"00000002_000.png": png, "00000003_001.png": dcm}
