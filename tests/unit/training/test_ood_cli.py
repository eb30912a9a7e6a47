"""Gates for bundles the user brings: ``import-weights --ood-images`` fits one on the user's
images, without it the bundle has none (and says so), ``training ood-gate`` refits one, and
``calibrate`` keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ai.bundle.load import load_bundle
from tests.helpers.torchvision_densenet import RefDenseNet121, randomised
from training.cli import main
from training.import_weights import import_weights
from training.synth import synthesize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchxrayvision-layout DenseNet121 state dict (random weights)."""
    path = tmp_path_factory.mktemp("xrv") / "nih-densenet121-state.pt"
    torch.save(randomised(RefDenseNet121(1, 18), seed=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def site_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    synthesize(out, 10, seed=21, size=(96, 80))
    return out


def test_import_without_images_has_no_gate_and_says_so(checkpoint: Path, tmp_path: Path) -> None:
    outcome = import_weights("torchxrayvision-densenet121", checkpoint, tmp_path / "b")
    assert outcome.metadata.ood == {} and load_bundle(tmp_path / "b").gate is None
    assert any("no out-of-distribution gate" in w for w in outcome.warnings)


def test_import_with_images_fits_a_gate_and_ood_gate_refits_it(
        checkpoint: Path, site_images: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "gated"
    assert main(["-q", "import-weights", "--format", "torchxrayvision-densenet121", "--weights",
                 str(checkpoint), "--out", str(bundle), "--ood-images", str(site_images)]) == 0
    assert "out-of-distribution gate: threshold" in capsys.readouterr().out
    gate = load_bundle(bundle).gate
    images = len(list(site_images.rglob("*.dcm")))
    assert gate is not None and gate.dim == 1024 and gate.n_fit + gate.n_val == images
    assert gate.layer == "class_layers.relu" and gate.quantile == 0.975
    assert main(["-q", "ood-gate", "--bundle", str(bundle), "--images", str(site_images),
                 "--quantile", "0.95", "--seed", "3"]) == 0
    refit = load_bundle(bundle).gate
    assert refit is not None and refit.quantile == 0.95 and "site" in refit.fitted_on
    assert main(["-q", "ood-gate", "--bundle", str(bundle), "--images",
                 str(tmp_path / "nothing-here")]) == 1
