"""``training calibrate``: thresholds meet the target on the calibration set (re-measured
through the node's Analyzer), Youden picks the hand-worked cut, and the bundle becomes a new
version with a new device UID and a calibration record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ai.bundle.load import load_bundle
from ai.bundle.metadata import read_metadata
from training.calibrate import (
    CalibrationError,
    bump_version,
    calibrate_label,
    calibrate_predictions,
    calibrated_metadata,
    write_bundle,
)
from training.cli import main
from training.evaluate import Prediction
from training.synth import synthesize


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cal_phantoms")
    synthesize(out, 8, seed=21, size=(160, 160), prevalence=0.5)
    return out


def test_youden_picks_the_hand_worked_cut() -> None:
    # descending: .9P .8P .7N .6P .5P .45N .3N .05N; (tp, fp) = (1,0) (2,0) (2,1) (3,1) (4,1)
    # (4,2) (4,3) (4,4); J = tp/4 - fp/4 peaks once, 0.75 at 0.5 -> cut (0.5 + 0.45) / 2
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.3, 0.45, 0.7, 0.5, 0.6, 0.8, 0.9])
    result = calibrate_label("nodule", 0.5, truth, scores, "youden", None)
    assert result.threshold == pytest.approx(0.475)
    assert result.sensitivity is not None and result.specificity is not None
    assert (result.sensitivity["value"], result.specificity["value"]) == (1.0, 0.75)


def test_target_sensitivity_by_hand() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.3, 0.45, 0.7, 0.5, 0.6, 0.8, 0.9])
    # 0.75 needs 3 of 4 positives: first reached at 0.6 -> cut (0.6 + 0.5) / 2
    r = calibrate_label("x", 0.5, truth, scores, "target_sensitivity", 0.75)
    assert r.threshold == pytest.approx(0.55) and r.sensitivity["value"] == 0.75  # type: ignore[index]
    skipped = calibrate_label("x", 0.5, np.zeros(4, int), scores[:4], "target_sensitivity", 0.9)
    assert skipped.threshold is None and "no positive cases" in skipped.reason


def test_bump_version() -> None:
    assert bump_version("1.2.3") == "1.2.4"
    assert bump_version("0.0.9-rc1") == "0.0.10"
    with pytest.raises(CalibrationError, match="--version"):
        bump_version("2024a")


def test_metadata_update_new_version_and_uid(tiny_bundle: Path, tmp_path: Path) -> None:
    meta = read_metadata(tiny_bundle)
    ident = meta.identity()
    truth = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    preds = [Prediction(ident, f"1.2.{i}", "cardiomegaly", s, 0.5, s >= 0.5, t)
             for i, (t, s) in enumerate(zip(truth, scores, strict=True))]  # fmt: skip
    results = calibrate_predictions(meta, preds, method="youden", labels=["Cardiomegaly"])
    assert [r.label for r in results] == ["cardiomegaly"]
    new = calibrated_metadata(meta, results, method="youden", target=None, data={"images": 6})
    saved = write_bundle(tiny_bundle, tmp_path / "cal", new)
    assert saved.version == "0.0.2" and saved.device_uid != meta.device_uid
    thresholds = {s.name: s.threshold for s in saved.labels}
    assert thresholds["nodule"] == 0.0 and thresholds["pneumothorax"] == 1.0  # untouched
    assert thresholds["cardiomegaly"] == pytest.approx((0.8 + 0.6) / 2)  # J 2/3 at 0.8
    record = saved.training["calibration"]
    assert record["method"] == "youden" and record["previous_device_uid"] == meta.device_uid
    assert record["labels"]["cardiomegaly"]["previous_threshold"] == 0.5
    assert load_bundle(tmp_path / "cal").identity.version == "0.0.2"
    with pytest.raises(CalibrationError, match="not in the bundle's labels"):
        calibrate_predictions(meta, preds, method="youden", labels=["edema"])
    # same weights, same version, other thresholds: the UID still differs
    other = calibrated_metadata(meta, [r.__class__(**{**vars(r), "threshold": 0.1})
                                       for r in results], method="youden", target=None, data={})  # fmt: skip
    assert write_bundle(tiny_bundle, tmp_path / "cal2", other).device_uid != saved.device_uid


def test_cli_target_sensitivity_is_met_when_remeasured(tiny_bundle: Path, phantoms: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = read_metadata(bundle)
    code = main(["-q", "calibrate", "--bundle", str(bundle), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--target-sensitivity", "0.9",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    after = read_metadata(bundle)
    assert after.version == "0.0.2" and after.device_uid != before.device_uid
    assert after.training["calibration"]["target_sensitivity"] == 0.9
    report = tmp_path / "report"
    assert main(["-q", "evaluate", "--bundle", str(bundle), "--data", str(phantoms), "--labels",
                 str(phantoms / "labels.csv"), "--out", str(report), "--device", "cpu",
                 "--bootstrap", "100", "--no-curves"]) == 0  # fmt: skip
    metrics = json.loads((report / "metrics.json").read_text())["models"][0]["metrics"]
    record = after.training["calibration"]["labels"]
    for label in ("nodule", "cardiomegaly", "pneumothorax"):
        assert metrics[label]["sensitivity"]["value"] >= 0.9
        assert metrics[label]["threshold"] == record[label]["threshold"]
        assert metrics[label]["sensitivity"]["value"] == record[label]["sensitivity"]["value"]
        assert metrics[label]["specificity"]["value"] == record[label]["specificity"]["value"]


def test_cli_refuses_bad_requests(tiny_bundle: Path, phantoms: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    base = ["-q", "calibrate", "--bundle", str(tiny_bundle), "--data", str(phantoms),
            "--labels", str(phantoms / "labels.csv"), "--device", "cpu"]  # fmt: skip
    assert main([*base, "--youden", "--target-sensitivity", "0.9"]) == 2  # mutually exclusive
    capsys.readouterr()
    assert main([*base, "--youden", "--labels-subset", "edema"]) == 1
    err = capsys.readouterr().err
    assert "not in the bundle's labels" in err and "Traceback" not in err
    (tmp_path / "taken").mkdir()
    assert main([*base, "--youden", "--out", str(tmp_path / "taken")]) == 1
    assert "add --force" in capsys.readouterr().err
    assert read_metadata(tiny_bundle).version == "0.0.1"  # the shared fixture is untouched
