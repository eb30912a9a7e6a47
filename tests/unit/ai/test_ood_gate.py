"""The out-of-distribution gate: fitted on a tiny trained bundle, scored by the Analyzer in
the findings' own forward pass, its threshold honoured, malformed gates refused."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.ood import fraction_passing, phantom_files

from ai.bundle.gate import GATE_PATH
from ai.bundle.load import load_bundle, save_bundle
from ai.bundle.metadata import METADATA_PATH
from ai.inference import Analyzer
from ai.types import BundleError
from training.demo import DEMO_LABELS
from training.ood import features, read_inputs

Gated = tuple[Path, list[Path], list[Path]]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 frontal phantoms the gate never saw (another synth seed)."""
    return phantom_files(tmp_path_factory.mktemp("held"), 32, 4242)[:40]


def _scores(bundle: Path, files: list[Path]) -> np.ndarray:
    loaded = load_bundle(bundle)
    assert loaded.gate is not None
    return loaded.gate.scores(features(loaded, read_inputs(loaded, files), loaded.gate.layer))


def test_validation_split_passes_the_configured_quantile(gated_bundle: Gated) -> None:
    bundle, fit, val = gated_bundle
    gate = load_bundle(bundle).gate
    assert gate is not None and gate.quantile == 0.975
    assert (gate.n_fit, gate.n_val) == (len(fit), len(val)) and not set(fit) & set(val)
    passing = fraction_passing(_scores(bundle, val), gate.threshold)
    # the threshold is a validation score: exactly ceil(q n) of n pass, never fewer than q
    assert 0.975 <= passing < 0.975 + 1 / len(val) + 1e-9, passing


def test_held_out_phantoms_pass_within_sampling(gated_bundle: Gated, held_out: list[Path]) -> None:
    bundle = gated_bundle[0]
    analyzer = Analyzer([bundle], device="cpu")
    results = analyzer.analyze([pydicom.dcmread(f) for f in held_out])
    passing = sum(not r.withheld for r in results) / len(results)
    spread = 3 * math.sqrt(0.975 * 0.025 / len(results))  # 3 sigma of a binomial at 0.975
    assert passing >= 0.975 - spread, passing
    # the Analyzer's score is the gate's score of the node's own features, not a lookalike
    expected = _scores(bundle, held_out)
    got = np.asarray([r.ood[0].score for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert all(r.ood[0].model == analyzer.models[0] and analyzer.models[0].ood_gate
               for r in results)


def test_threshold_is_honoured(gated_bundle: Gated, held_out: list[Path], tmp_path: Path) -> None:
    """The same image, the same score: withheld just above the threshold, passed below."""
    loaded = load_bundle(gated_bundle[0])
    assert loaded.gate is not None
    ds = pydicom.dcmread(held_out[0])
    score = float(_scores(gated_bundle[0], held_out[:1])[0])
    for factor, withheld in ((0.99, True), (1.01, False)):
        target = tmp_path / f"b{factor}"
        save_bundle(target, loaded.metadata, loaded.model,
                    gate=replace(loaded.gate, threshold=score * factor))
        (result,) = Analyzer([target], device="cpu").analyze([ds])
        (verdict,) = result.ood
        assert verdict.out_of_distribution is withheld
        assert verdict.threshold == pytest.approx(score * factor)
        if withheld:  # no findings at all, so no positives, no boxes, no heatmap
            assert result.findings == [] and result.heatmap is None
            assert result.withheld == [verdict] and not result.abnormal
        else:  # ALWAYS_POSITIVE has threshold 0: always positive
            assert result.withheld == [] and len(result.findings) == len(DEMO_LABELS)
            assert any(f.positive for f in result.findings)


def test_gate_costs_no_second_forward(gated_bundle: Gated, held_out: list[Path]) -> None:
    analyzer = Analyzer([gated_bundle[0]], device="cpu", batch_size=8)
    model = analyzer._runners[0].bundle.model
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = analyzer.analyze([pydicom.dcmread(f) for f in held_out[:3]])
    finally:
        handle.remove()
    assert len(calls) == 1 and all(len(r.ood) == 1 for r in results)


def test_a_bundle_without_gate_gives_no_verdict(tiny_bundle: Path, held_out: list[Path]) -> None:
    analyzer = Analyzer([tiny_bundle], device="cpu")
    (result,) = analyzer.analyze([pydicom.dcmread(held_out[0])])
    assert result.ood == [] and result.withheld == [] and not analyzer.models[0].ood_gate


def _broken(src: Path, dst: Path, change: str) -> Path:
    shutil.copytree(src, dst)
    meta_path = dst / METADATA_PATH
    doc = json.loads(meta_path.read_text())
    if change == "npz":
        (dst / GATE_PATH).write_bytes(b"not an npz")
    elif change == "missing":
        (dst / GATE_PATH).unlink()
    else:
        key, value = change.split("=")
        doc["ood"][key] = json.loads(value)
    meta_path.write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize(("change", "message"), [
    ("npz", "does not match ood.sha256"),
    ("missing", "ood_gate.npz is missing"),
    ("version=99", "ood.version = \"99\" is not supported"),
    ("threshold=-1", "ood.threshold = \"-1\" must be positive"),
    ("quantile=1.5", "ood.quantile = \"1.5\" must lie in"),
    ("weights_sha256=\"00\"", "fitted for other weights"),
    ("dim=3", "metadata says dim 3"),
])
def test_malformed_gates_are_refused(gated_bundle: Gated, tmp_path: Path, change: str,
                                     message: str) -> None:
    broken = _broken(gated_bundle[0], tmp_path / "broken", change)
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        load_bundle(broken)
