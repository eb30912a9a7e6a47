"""The demo bundle builder: a quick build loads in the node's Analyzer and is marked DEMO."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ai.bundle import load_bundle
from ai.codes import DEFAULT_CODES
from ai.inference import Analyzer
from training import demo
from training.phantoms import FINDINGS


@pytest.fixture(scope="module")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_demo_bundle(
        tmp_path_factory.mktemp("demo") / "bundle", seed=0, progress=False, quick=True
    )


def test_quick_bundle_metadata(quick_bundle: Path) -> None:
    loaded = load_bundle(quick_bundle)
    meta = loaded.metadata
    assert meta.name == "cxr-demo-classifier" and meta.demo and loaded.identity.demo
    assert "DEMO" in loaded.identity.display_name
    assert meta.label_names == list(FINDINGS)
    assert meta.labels[1].code == DEFAULT_CODES["cardiomegaly"]
    assert all(0.0 <= label.threshold <= 1.0 for label in meta.labels)
    assert meta.multi_label and meta.input.size == 224
    assert meta.network.name == "densenet"
    assert meta.training["quick"] is True and meta.training["seed"] == 0
    per_label = meta.validation_metrics["per_label"]
    assert set(per_label) == set(FINDINGS)
    assert {"sensitivity", "specificity", "auroc"} <= set(per_label["nodule"]["test"])


def test_quick_bundle_runs_in_the_analyzer(quick_bundle: Path, realdicom: Path) -> None:
    ds = pydicom.dcmread(realdicom / "dx_chest_nih_cxr14_sc.dcm")
    (result,) = Analyzer([quick_bundle], device="cpu").analyze([ds])
    assert [f.label for f in result.findings] == list(FINDINGS)
    assert all(f.model.demo for f in result.findings)
    if result.abnormal:
        assert result.heatmap is not None and result.heatmap.shape == (1024, 1024)


def test_patient_halves_do_not_share_patients() -> None:
    patients = ["a", "b", "a", "c", "d", "b", "e", "f"]
    cal, test = demo._patient_halves(patients, seed=0)
    assert not (cal & test).any() and (cal | test).all()
    assert {p for p, c in zip(patients, cal, strict=True) if c}.isdisjoint(
        {p for p, t in zip(patients, test, strict=True) if t}
    )


def test_display_like_stays_in_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 48)).astype(np.float32)
    for _ in range(10):
        out = demo._display_like(image, rng)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_cli_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, dict]] = []

    def fake_build(out_dir: Path, **kwargs: object) -> Path:
        calls.append((out_dir, kwargs))
        return out_dir

    monkeypatch.setattr(demo, "build_demo_bundle", fake_build)
    parser = argparse.ArgumentParser(prog="training")
    demo.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-bundles", "--out", str(tmp_path), "--quick"])
    assert args.func(args) == 0
    assert calls == [
        (tmp_path / "cxr-demo-classifier", {"seed": 0, "progress": True, "quick": True})
    ]
