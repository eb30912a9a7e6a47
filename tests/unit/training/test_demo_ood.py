"""The quick demo bundles' out-of-distribution gates: held-out DICOM phantoms pass, both real
chest radiographs in shared/realdicom are flagged, by the classifier and by the detector."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest import REALDICOM
from helpers.demo_build import Build

from ai.inference import Analyzer
from training.ood import phantom_files_of_sizes, phantom_sizes

REAL = ["cr_chest_pa_philips_j2k.dcm", "dx_chest_nih_cxr14_sc.dcm"]


@pytest.fixture(scope="module")
def analyzer(quick_demo_build: Build) -> Analyzer:
    """The quick demo bundles as ``training demo-bundles --quick`` builds them (once)."""
    bundles = [quick_demo_build.out / n for n in ("cxr-demo-classifier", "cxr-demo-detector")]
    return Analyzer(bundles, device="cpu", gradcam=False)


def test_quick_demo_bundles_pass_held_out_phantoms(analyzer: Analyzer, tmp_path: Path) -> None:
    """40 frontal phantoms from a seed no build used, at sizes neither gate was fitted on
    (between the rungs of training.ood.phantom_sizes: a gate fitted at a few sizes only
    withheld most phantoms of the sizes between them)."""
    sizes = [(560, 480), (704, 768)]
    for seen in (phantom_sizes(128, quick=True), phantom_sizes(224, quick=True)):
        assert not set(sizes) & set(seen)
    files = phantom_files_of_sizes(tmp_path, 36, 777, sizes)[:40]
    assert len(files) == 40
    results = analyzer.analyze([pydicom.dcmread(f) for f in files])
    for model in analyzer.models:
        assert model.ood_gate, model
        passed = sum(not v.out_of_distribution for r in results for v in r.ood if v.model == model)
        print(f"{model.name}: {passed}/40 held-out phantoms pass")
        assert passed >= 38, f"{model.name}: only {passed} of 40 phantoms pass"  # >= 95 %


@pytest.mark.parametrize("name", REAL)
def test_quick_demo_bundles_flag_real_radiographs(analyzer: Analyzer, name: str) -> None:
    (result,) = analyzer.analyze([pydicom.dcmread(REALDICOM / name)])
    flagged = {v.model.name: (round(v.score, 1), round(v.threshold, 1)) for v in result.withheld}
    print(f"{name}: {flagged}")
    assert set(flagged) == {m.name for m in analyzer.models}, flagged
    assert result.findings == []
