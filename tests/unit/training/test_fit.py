"""`training fit`: run folder, bundle the node loads, caching, resume, CLI errors, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import DenseNet

import ai.pixels
from ai.bundle.load import load_bundle
from ai.inference import Analyzer
from ai.networks import build_network
from training.cli import main
from training.fit import checkpoint
from training.fit.classification import FitConfig, fit
from training.synth import synthesize

ROOT = Path(__file__).resolve().parents[3]
TINY_NET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 studies (~37 images, ~25 patients) of 96 px phantoms."""
    root = tmp_path_factory.mktemp("fit") / "data"
    synthesize(root, 30, seed=3, size=96, prevalence=0.4)
    return root


def _config(data: Path, out: Path, **changes: object) -> FitConfig:
    base = dict(
        data=data, labels=data / "labels.csv", out=out, network="densenet", network_args=TINY_NET,
        image_size=32, epochs=2, batch_size=8, lr=3e-3, threads=1, progress=False, seed=1,
        patience=0, split=(0.6, 0.2, 0.2),
    )  # fmt: skip
    base.update(changes)
    return FitConfig(**base)  # type: ignore[arg-type]


def _cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "fit", "--data", str(data), "--labels", str(data / "labels.csv"), "--out",
            str(out), "--network", "densenet", "--network-args", json.dumps(TINY_NET),
            "--image-size", "32", "--batch-size", "8", "--threads", "1", "--seed", "1",
            "--split", "0.6,0.2,0.2", *extra]  # fmt: skip


def _label_rows(data: Path) -> list[dict[str, str]]:
    with (data / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ a complete run


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    decodes: list[int] = []
    real = ai.pixels.decode_frame

    def counting(ds: pydicom.Dataset, *args: object, **kwargs: object) -> np.ndarray:
        decodes.append(1)
        return real(ds, *args, **kwargs)

    out = tmp_path_factory.mktemp("runs") / "run"
    ai.pixels.decode_frame = counting  # type: ignore[assignment]
    try:
        result = fit(_config(data, out, epochs=3, disk_cache=False))
    finally:
        ai.pixels.decode_frame = real
    return {"result": result, "out": out, "decodes": len(decodes)}


def test_each_image_is_decoded_once_over_all_epochs(finished_run: dict, data: Path) -> None:
    images = len(_label_rows(data))
    assert finished_run["result"].state.epoch == 3
    assert finished_run["decodes"] == images, "epochs after the first must not decode DICOM"


def test_run_folder_records(finished_run: dict, data: Path) -> None:
    out: Path = finished_run["out"]
    for name in ("run_config.json", "split.json", "data_report.txt", "metrics.json",
                 "predictions.csv", "last.pt", "best.pt", "bundle/configs/metadata.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    record = json.loads((out / "run_config.json").read_text())
    assert record["args"]["network"] == "densenet" and record["args"]["epochs"] == 3
    assert {"torch", "monai", "numpy", "pydicom", "python"} <= set(record["versions"])
    assert "git_commit" in record and record["data"]["images"] == len(_label_rows(data))
    assert record["results"]["epochs_completed"] == 3 and record["results"]["world_size"] == 1
    assert set(record["data"]["splits"]) == {"train", "val", "test"}
    text = json.dumps(record) + (out / "data_report.txt").read_text()
    assert not any(r["patient_id"] in text for r in _label_rows(data)), "no patient ids"


def test_split_is_patient_level(finished_run: dict, data: Path) -> None:
    split = json.loads((finished_run["out"] / "split.json").read_text())
    patient_of = {r["sop_instance_uid"]: r["patient_id"] for r in _label_rows(data)}
    seen: dict[str, str] = {}
    for name, uids in split["sop_instance_uids"].items():
        for uid in uids:
            pid = patient_of[uid]
            assert seen.setdefault(pid, name) == name, "a patient is in two splits"
            assert split["patients"][pid] == name
    assert sorted(seen) == sorted(set(patient_of.values()))


def test_bundle_loads_and_the_node_agrees_with_training(finished_run: dict, data: Path) -> None:
    out: Path = finished_run["out"]
    loaded = load_bundle(out / "bundle")
    meta = loaded.metadata
    metrics = json.loads((out / "metrics.json").read_text())
    assert meta.task == "classification" and meta.multi_label and meta.input.size == 32
    assert meta.network.name == "densenet" and meta.training["epochs_completed"] == 3
    for label in meta.labels:
        entry = meta.validation_metrics["per_label"][label.name]
        assert label.threshold == pytest.approx(metrics["per_label"][label.name]["threshold"])
        assert entry["threshold_method"] in ("youden",) or entry["threshold_method"].startswith(
            "default"
        )
        for split in ("val", "test"):
            figures = entry[split]
            for key in ("sensitivity", "specificity", "auroc"):
                assert set(figures[key]) == {"value", "lower", "upper"}
    with (out / "predictions.csv").open(newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    path = next(
        data / r["path"]
        for r in _label_rows(data)
        if r["sop_instance_uid"] == row["sop_instance_uid"]
    )
    result = Analyzer([out / "bundle"], device="cpu", gradcam=False).analyze(
        [pydicom.dcmread(path)]
    )[0]
    for finding in result.findings:
        assert finding.probability == pytest.approx(float(row[f"prob_{finding.label}"]), abs=1e-5)


# ------------------------------------------------------------------ resume


def test_resume_continues_the_same_run_exactly(data: Path, tmp_path: Path) -> None:
    fit(_config(data, tmp_path / "straight", epochs=3))

    def interrupt(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # as if the job was killed after epoch 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        fit(_config(data, tmp_path / "resumed", epochs=3), on_epoch_end=interrupt)
    mid = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert mid["epoch"] == 2
    result = fit(_config(data, tmp_path / "resumed", epochs=3), resume=True)
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert result.state.epoch == b["epoch"] == a["epoch"] == 3 and b["step"] == a["step"]
    assert b["step"] == mid["step"] * 3 // 2
    assert b["best_metric"] == a["best_metric"] and b["best_epoch"] == a["best_epoch"]
    assert json.loads(b["history"]) == [
        {**r, "seconds": b_r["seconds"]}
        for r, b_r in zip(json.loads(a["history"]), json.loads(b["history"]), strict=True)
    ]
    steps_a = [s["step"].item() for s in a["optimizer"]["state"].values()]
    steps_b = [s["step"].item() for s in b["optimizer"]["state"].values()]
    assert steps_a == steps_b == [b["step"]] * len(steps_a)
    for key in ("exp_avg", "exp_avg_sq"):
        for sa, sb in zip(
            a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
        ):
            assert torch.equal(sa[key], sb[key])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_cli_resume_extends_a_finished_run(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_cli_args(data, out, "--epochs", "2")) == 0
    first = checkpoint.load(out / "last.pt")
    assert main(["-q", "fit", "--resume", str(out), "--epochs", "3"]) == 0
    last = checkpoint.load(out / "last.pt")
    per_epoch = first["step"] // 2
    assert last["epoch"] == 3 and last["step"] == 3 * per_epoch
    assert {s["step"].item() for s in last["optimizer"]["state"].values()} == {3 * per_epoch}
    assert last["best_metric"] >= first["best_metric"]
    assert len(json.loads(last["history"])) == 3
    record = json.loads((out / "run_config.json").read_text())
    assert len(record["resumes"]) == 1 and record["args"]["epochs"] == 3
    assert "3 epoch(s)" in capsys.readouterr().out
    assert main(["-q", "fit", "--resume", str(out), "--network", "resnet18"]) == 1
    assert "cannot change" in capsys.readouterr().err


@pytest.mark.parametrize("network", ["densenet121", "resnet18", "resnet50", "efficientnet-b0"])
def test_every_network_trains_and_bundles(data: Path, tmp_path: Path, network: str) -> None:
    result = fit(_config(data, tmp_path / network, network=network, network_args={},
                         epochs=1, max_steps=1, batch_size=4))  # fmt: skip
    meta = load_bundle(result.bundle_dir).metadata
    assert meta.network.name == network and result.state.step == 1


def test_early_stopping_and_max_steps(data: Path, tmp_path: Path) -> None:
    stopped = fit(_config(data, tmp_path / "early", epochs=6, patience=1, min_delta=1.0))
    assert (
        stopped.state.stopped_early and stopped.state.epoch == 2 and stopped.state.best_epoch == 1
    )
    assert json.loads((tmp_path / "early" / "run_config.json").read_text())["results"][
        "stopped_early"
    ]
    capped = fit(_config(data, tmp_path / "capped", epochs=6, max_steps=3))
    assert capped.state.step == 3 and capped.state.epoch == 1


# ------------------------------------------------------------------ errors


def _write_labels(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_cli_errors_are_messages_not_tracebacks(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _label_rows(data)
    unmatched = _write_labels(
        tmp_path / "none.csv", [["sop_instance_uid", "nodule"], ["1.2.3", "1"]]
    )
    partial = _write_labels(tmp_path / "partial.csv", [["sop_instance_uid", "nodule"]]
                            + [[r["sop_instance_uid"], r["nodule"]] for r in rows[1:]])  # fmt: skip
    cases = [
        (["-q", "fit", "--data", str(data)], 2, "--labels, --out required"),
        (["-q", "fit", "--data", str(tmp_path / "nope"), "--labels", str(data / "labels.csv"),
          "--out", str(tmp_path / "r1")], 1, "is not a folder"),
        (["-q", "fit", "--data", str(data), "--labels", str(unmatched), "--out", str(tmp_path / "r2")],
         1, "no image matched"),
        (["-q", "fit", "--data", str(data), "--labels", str(partial), "--out", str(tmp_path / "r3"),
          "--strict"], 1, "images without labels: 1"),
        (_cli_args(data, tmp_path / "r4", "--network", "vgg16"), 1, 'network "vgg16" is not one of'),
        (_cli_args(data, tmp_path / "r5", "--network-args", '{"bogus": 1}'), 1, "rejects args"),
        (_cli_args(data, tmp_path / "r6", "--pretrained", str(tmp_path / "missing.pt")), 1, "does not exist"),
        (["-q", "fit", "--resume", str(tmp_path)], 1, "not a training run folder"),
        (_cli_args(data, tmp_path / "r7", "--split", "0.5,0.5"), 2, "three fractions"),
    ]  # fmt: skip
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_existing_run_is_not_overwritten(
    finished_run: dict, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_cli_args(data, finished_run["out"])) == 1
    assert "already holds a run" in capsys.readouterr().err


# ------------------------------------------------------------------ options


def test_pretrained_weights_adapt_rgb_stem_and_report_mismatches(tmp_path: Path) -> None:
    rgb = DenseNet(spatial_dims=2, in_channels=3, out_channels=3, init_features=8, growth_rate=4,
                   block_config=(1, 1, 1, 1))  # an "ImageNet-style" 3-channel net  # fmt: skip
    state = {f"module.{k}": v for k, v in rgb.state_dict().items()}  # a DDP-saved file
    state["extra.weight"] = torch.ones(2)
    torch.save({"state_dict": state}, tmp_path / "weights.pt")
    model = build_network("densenet", TINY_NET, num_classes=5).module
    report = checkpoint.load_pretrained(model, tmp_path / "weights.pt")
    stem = "features.conv0.weight"
    assert torch.equal(model.state_dict()[stem], rgb.state_dict()[stem].sum(dim=1, keepdim=True))
    assert report["unexpected"] == ["extra.weight"]
    assert {m.split(":")[0] for m in report["shape_mismatch"]} == {
        "class_layers.out.weight",
        "class_layers.out.bias",
    }
    assert set(report["missing"]) == {"class_layers.out.weight", "class_layers.out.bias"}
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no state_dict"):
        checkpoint.load_pretrained(model, tmp_path / "bad.pt")


def test_cli_pretrained_from_an_earlier_bundle(
    finished_run: dict, data: Path, tmp_path: Path
) -> None:
    weights = finished_run["out"] / "bundle" / "models" / "model.pt"
    out = tmp_path / "warm"
    assert main(_cli_args(data, out, "--pretrained", str(weights), "--max-steps", "1")) == 0
    report = json.loads((out / "run_config.json").read_text())["pretrained"]
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []
    assert report["loaded"] == len(torch.load(weights, weights_only=True))


def test_multiclass_focal_weighted_with_workers(data: Path, tmp_path: Path) -> None:
    rows = _label_rows(data)
    labels = _write_labels(tmp_path / "mc.csv", [["sop_instance_uid", "label"]] + [
        [r["sop_instance_uid"], "cardiomegaly" if r["cardiomegaly"] == "1" else "normal"] for r in rows
    ])  # fmt: skip
    config = _config(data, tmp_path / "mc", labels=labels, epochs=1, loss="focal",
                     sampler="weighted", num_workers=2)  # fmt: skip
    result = fit(config)
    meta = load_bundle(result.bundle_dir).metadata
    assert not meta.multi_label and meta.label_names == ["cardiomegaly", "normal"]
    found = Analyzer([result.bundle_dir], device="cpu", gradcam=False).analyze(
        [pydicom.dcmread(data / rows[0]["path"])]
    )[0]
    assert sum(f.probability for f in found.findings) == pytest.approx(1.0, abs=1e-5)
    in_process = fit(replace_config(config, out=tmp_path / "mc0", num_workers=0))
    a = checkpoint.load(result.run_dir / "last.pt")["model"]
    b = checkpoint.load(in_process.run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "workers must not change what is learnt"


def replace_config(config: FitConfig, **changes: object) -> FitConfig:
    from dataclasses import replace

    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(data: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail("torchrun is missing from the environment")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "training",
           *_cli_args(data, out, "--epochs", "1", "--max-steps", "2", "--batch-size", "4")]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 60
    record = json.loads((out / "run_config.json").read_text())
    assert record["results"]["world_size"] == 2 and record["results"]["steps"] == 2
    assert load_bundle(out / "bundle").metadata.training["world_size"] == 2
    assert proc.stdout.count("bundle:") == 1, "only rank 0 reports"
    shutil.rmtree(out / "cache", ignore_errors=True)
