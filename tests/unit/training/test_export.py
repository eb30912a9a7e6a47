"""``training export``: a complete, loadable bundle; identity rules; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from ai.bundle.load import load_bundle
from ai.bundle.metadata import read_metadata
from ai.inference import Analyzer
from training.cli import main
from training.export import ExportError, export_bundle, find_run_bundle
from training.synth import synthesize


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export_phantoms")
    synthesize(out, 4, seed=31, size=(160, 128), prevalence=0.5)
    return out


@pytest.fixture(scope="module")
def metrics_json(tiny_bundle: Path, phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    out = tmp_path_factory.mktemp("export_eval")
    assert main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(phantoms),
                 "--labels", str(phantoms / "labels.csv"), "--out", str(out), "--device", "cpu",
                 "--bootstrap", "100", "--no-curves"]) == 0  # fmt: skip
    return out / "metrics.json"


@pytest.fixture(scope="module")
def trained_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with the training record ``training fit`` writes (data, config)."""
    bundle = tmp_path_factory.mktemp("export_src") / "trained"
    shutil.copytree(tiny_bundle, bundle)
    path = bundle / "configs" / "metadata.json"
    doc = json.loads(path.read_text())
    doc["training"] = {"data": {"images": 40, "patients": 20}, "config": {"epochs": 1}}
    path.write_text(json.dumps(doc))
    return bundle


def _one_dicom(phantoms: Path) -> Path:
    return sorted(phantoms.rglob("*.dcm"))[0]


def test_export_complete_bundle_loads_in_the_node(trained_bundle: Path, phantoms: Path,
                                                  metrics_json: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "released"
    code = main(["-q", "export", "--bundle", str(trained_bundle), "--out", str(out), "--name",
                 "cxr-test", "--version", "1.0.0", "--metrics", str(metrics_json),
                 "--check-dicom", str(_one_dicom(phantoms))])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0 and "check: loaded and analysed one image" in stdout
    meta = read_metadata(out)
    source = read_metadata(trained_bundle)
    assert (meta.name, meta.version) == ("cxr-test", "1.0.0")
    assert meta.device_uid and meta.device_uid != source.device_uid  # new identity, new UID
    assert meta.weights_sha256 == source.weights_sha256
    assert [s.code.value for s in meta.labels] == ["27925004", "287272002", "36118008"]
    vm = meta.validation_metrics
    assert vm["source"] == "training evaluate" and "sensitivity" in vm["metrics"]["nodule"]
    assert vm["data"]["evaluated_images"] > 0
    assert meta.training["export"]["source"]["device_uid"] == source.device_uid
    assert "cxr-test 1.0.0" in (out / "docs" / "README.md").read_text()
    (result,) = Analyzer([out], device="cpu").analyze([pydicom.dcmread(_one_dicom(phantoms))])
    assert result.models[0].device_uid == meta.device_uid
    assert not list(tmp_path.glob(".released.*"))  # no staging folder left behind


def test_refuses_overwrite_without_force(trained_bundle: Path, metrics_json: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "b"
    args = ["-q", "export", "--bundle", str(trained_bundle), "--out", str(out), "--metrics",
            str(metrics_json)]  # fmt: skip
    assert main(args) == 0
    first = read_metadata(out)
    assert first.device_uid == read_metadata(trained_bundle).device_uid  # same identity, same UID
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "exists; add --force" in err and "Traceback" not in err
    assert main([*args, "--force", "--version", "0.0.9"]) == 0
    assert read_metadata(out).version == "0.0.9"


def test_incomplete_metadata_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="validation metrics.*training record"):
        export_bundle(tiny_bundle, tmp_path / "x")
    outcome = export_bundle(tiny_bundle, tmp_path / "x", allow_incomplete=True)
    assert any("incomplete" in w for w in outcome.warnings)
    assert load_bundle(tmp_path / "x").metadata.training["export"]["warnings"]


def test_metrics_of_another_operating_point_are_refused(tiny_bundle: Path, metrics_json: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle, moved)
    doc = json.loads((moved / "configs" / "metadata.json").read_text())
    doc["labels"][1]["threshold"] = 0.25
    (moved / "configs" / "metadata.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="no entry for these weights and thresholds"):
        export_bundle(moved, tmp_path / "y", metrics_json=metrics_json)


def test_run_folder_with_config(tiny_bundle: Path, metrics_json: Path, tmp_path: Path) -> None:
    """A ``training fit`` run folder: ``bundle/`` plus ``run_config.json``."""
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "bundle")
    (run / "run_config.json").write_text(json.dumps({"epochs": 3, "lr": 0.001}))
    (run / "split.json").write_text("{}")
    assert find_run_bundle(run) == run / "bundle"
    assert main(["-q", "export", "--run", str(run), "--out", str(tmp_path / "out"),
                 "--metrics", str(metrics_json)]) == 0  # fmt: skip
    # the run's configuration is the training record the bare bundle lacked
    assert read_metadata(tmp_path / "out").training["config"] == {"epochs": 3, "lr": 0.001}
    with pytest.raises(ExportError, match="no bundle"):
        find_run_bundle(tmp_path / "out" / "docs")


def test_export_help_and_source_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--help"]) == 0
    assert "--check-dicom" in capsys.readouterr().out
    assert main(["export", "--out", "x"]) == 2  # one of --run / --bundle is required
