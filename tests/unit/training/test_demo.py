"""The demo bundle builder: a quick build loads in the node's Analyzer and is marked DEMO;
``training demo-bundles`` says what it builds (stage N of M), labels its progress bars, draws
them only on a terminal, and prints the validation figures each bundle reached."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.demo_build import Build

from ai.bundle.load import load_bundle
from ai.codes import DEFAULT_CODES
from ai.inference import Analyzer
from training import demo
from training.phantoms import FINDINGS


@pytest.fixture(scope="module")
def quick_bundle(quick_demo_build: Build) -> Path:
    return quick_demo_build.out / "cxr-demo-classifier"


def test_quick_bundle_metadata(quick_bundle: Path) -> None:
    loaded = load_bundle(quick_bundle)
    meta = loaded.metadata
    assert meta.name == "cxr-demo-classifier" and meta.demo and loaded.identity.demo
    assert "DEMO" in loaded.identity.display_name
    assert meta.label_names == list(demo.DEMO_LABELS) == [n for n in FINDINGS if n != "nodule"]
    assert meta.labels[0].code == DEFAULT_CODES["cardiomegaly"]
    assert all(0.0 <= label.threshold <= 1.0 for label in meta.labels)
    assert meta.multi_label and meta.input.size == 224
    assert meta.network.name == "densenet"
    assert meta.training["quick"] is True and meta.training["seed"] == 0
    per_label = meta.validation_metrics["per_label"]
    assert set(per_label) == set(demo.DEMO_LABELS)
    assert {"sensitivity", "specificity", "auroc"} <= set(per_label["cardiomegaly"]["test"])


def test_quick_bundles_carry_the_localisation_and_image_level_figures(quick_demo_build: Build) -> None:
    """Grad-CAM pointing game and lung energy per label (None where the held-out half had
    no true positive), and the detector's image-level nodule figures."""
    meta = load_bundle(quick_demo_build.out / "cxr-demo-classifier").metadata
    v = meta.validation_metrics
    assert "pointing game" in v["localisation_method"]
    measured = {k: e["localisation"] for k, e in v["per_label"].items() if e["localisation"]}
    assert set(v["per_label"]) == set(demo.DEMO_LABELS) and measured  # quick: 3 of 4 measured
    for entry in measured.values():
        assert 1 <= entry["tp_images"] and 0 <= entry["hits"] <= entry["tp_images"]
        assert entry["hit_rate"]["value"] == pytest.approx(entry["hits"] / entry["tp_images"])
        assert 0.0 <= entry["lung_energy"] <= 1.0 and entry["tolerance_model_px"] == 15.0
    assert meta.training["localisation_seconds"] >= 0
    detector = load_bundle(quick_demo_build.out / "cxr-demo-detector").metadata
    image = detector.validation_metrics["image_level"]
    assert image["images"] == image["n_positive"] + image["n_negative"] > 0
    assert {"sensitivity", "specificity", "auroc"} <= set(image)
    # through the bundle's own (phantom-fitted) gate: in-distribution images are not withheld
    # (the fit run's one-size gate withheld every one: all scores 0, AUROC 0.5)
    assert image["withheld_out_of_distribution"] <= 1
    # the node's nodule finding (a box >= the label threshold) uses the image-level threshold
    assert detector.labels[0].threshold == image["threshold"]
    assert detector.validation_metrics["per_label"]["nodule"]["threshold"] == image["threshold"]


def test_quick_bundle_runs_in_the_analyzer(quick_bundle: Path, realdicom: Path) -> None:
    from training.synth import make_dataset

    analyzer = Analyzer([quick_bundle], device="cpu")
    (real,) = analyzer.analyze([pydicom.dcmread(realdicom / "dx_chest_nih_cxr14_sc.dcm")])
    assert real.findings == [] and real.ood[0].out_of_distribution  # phantom-trained: gated
    ds = make_dataset("dx_mono2_explicit", seed=3, rows=1024, columns=1024)
    (result,) = analyzer.analyze([ds])
    assert [f.label for f in result.findings] == list(demo.DEMO_LABELS)
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


def test_build_says_what_it_builds_and_what_each_bundle_reached(quick_demo_build: Build) -> None:
    out = quick_demo_build.stdout
    assert "\r" not in out  # stage lines and figures only: a log file reads them as lines
    lines = out.splitlines()
    assert lines[0].startswith("Building the DEMO bundles") and "quick build, 2 stages" in lines[0]
    assert re.search(r"^\[1/2\] demo classifier \(DenseNet, 224 px, 4 labels\): 64 rendered "
                     r"phantoms, 8 training steps", out, re.MULTILINE), out
    assert re.search(r"^\[2/2\] demo nodule detector \(RetinaNet, .*128 px\): 16 DICOM "
                     r"phantom studies, 1 epoch", out, re.MULTILINE), out
    figure = r"(\d\.\d\d \(\d\.\d\d-\d\.\d\d\)|n/a)"
    for label in demo.DEMO_LABELS:  # threshold, pos/neg, sens, spec, AUROC, hit rate, energy
        assert re.search(rf"^ +{label} +\d\.\d\d +\d+/\d+ +{figure} +{figure} +{figure} "
                         rf"+{figure} \[\d+\] +(\d\.\d\d|n/a)$", out, re.MULTILINE), (label, out)
    assert "nodule" not in out.split("[2/2]")[0].split("validation:")[1]
    assert re.search(r"image-level nodule finding on \d+ fresh DICOM phantoms", out), out
    assert re.search(r"^ +class +split +images +instances +P +R +AP50 +AP50-95$", out,
                     re.MULTILINE), out
    for split in ("val", "test"):
        assert re.search(rf"^ +nodule +{split} +\d+ +\d+ +(\d\.\d\d|n/a)( +\d\.\d\d){{3}}$",
                         out, re.MULTILINE), (split, out)
    assert re.search(r"^DEMO bundles ready in \d+ s under ", lines[-1]), out
    for name in ("cxr-demo-classifier", "cxr-demo-detector"):
        assert (quick_demo_build.out / name / "configs" / "metadata.json").is_file()
        assert re.search(rf"{name} 1\.0\.0-quick written to .*{name} in \d+ s", out), out


def test_progress_bars_are_labelled_on_a_terminal(quick_demo_build: Build) -> None:
    bars = quick_demo_build.terminal
    assert "\r" in bars  # drawn: stderr is a terminal
    for desc in ("[1/2] render phantoms", "[1/2] train", "[1/2] validation: write DICOM",
                 "[2/2] phantoms", "[2/2] preprocess", "[2/2] epoch 1/1"):
        assert desc in bars, (desc, bars[-2000:])


def test_no_progress_bars_into_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr not a terminal (the node's log file): the builders get progress=False."""
    seen: list[tuple[Path, dict]] = []

    def fake_build(out_dir: Path, **kwargs: object) -> Path:
        seen.append((out_dir, kwargs))
        raise SystemExit(0)  # the arguments are what this test is about

    monkeypatch.setattr(demo, "build_demo_bundle", fake_build)
    parser = argparse.ArgumentParser(prog="training")
    demo.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-bundles", "--out", str(tmp_path), "--quick"])
    with pytest.raises(SystemExit):
        args.func(args)
    assert seen == [(tmp_path / "cxr-demo-classifier",
                     {"seed": 0, "progress": False, "quick": True, "label": "[1/2] "})]
    assert capsys.readouterr().out.startswith("Building the DEMO bundles")
