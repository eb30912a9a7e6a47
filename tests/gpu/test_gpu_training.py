"""One training step on CUDA with AMP, through ``training.fit.classification.fit`` (the path of
``training fit`` and of the demo bundles): float16 autocast, an enabled GradScaler, a
finite loss, weights that changed, and a bundle the node then loads on the CPU.

Run with ``pytest -m gpu`` on a machine with an NVIDIA GPU; skipped elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import training.fit.classification
from ai.inference import Analyzer
from training.fit.classification import FitConfig, fit
from training.fit.distributed import unwrap
from training.synth import make_dataset, synthesize

pytestmark = pytest.mark.gpu

TINY_NET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 studies of 64 px phantoms: enough for a train and a validation split."""
    root = tmp_path_factory.mktemp("gpu-fit") / "data"
    synthesize(root, 12, seed=3, size=64, prevalence=0.5)
    return root


def _first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d))


def _spy_on_train_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Wrap fit's ``train_steps`` to see the device, AMP state, activations and weights."""
    seen: dict[str, Any] = {"dtypes": []}
    real = training.fit.classification.train_steps

    def spy(model: nn.Module, loader: Any, loss_fn: nn.Module, opt: Any, device: torch.device,
            **kwargs: Any) -> tuple[int, float]:  # fmt: skip
        seen.update(device=device, amp=opt.amp, scaler=opt.scaler.is_enabled())
        params = dict(unwrap(model).named_parameters())
        seen["before"] = {name: p.detach().clone() for name, p in params.items()}
        hook = _first_conv(model).register_forward_hook(
            lambda _m, _i, out: seen["dtypes"].append(out.dtype))
        try:
            steps, loss = real(model, loader, loss_fn, opt, device, **kwargs)
        finally:
            hook.remove()
        seen["after"] = {name: p.detach().clone() for name, p in params.items()}
        seen.update(steps=steps, loss=loss)
        return steps, loss

    monkeypatch.setattr(training.fit.classification, "train_steps", spy)
    return seen


def test_one_amp_training_step_on_cuda(data: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    seen = _spy_on_train_steps(monkeypatch)
    config = FitConfig(
        data=data, labels=data / "labels.csv", out=tmp_path / "run", network="densenet",
        network_args=TINY_NET, image_size=32, epochs=1, max_steps=1, batch_size=4, lr=1e-3,
        threads=1, progress=False, seed=1, patience=0, split=(0.6, 0.2, 0.2), device="cuda",
        amp=True, disk_cache=False,
    )  # fmt: skip
    result = fit(config)

    assert seen["device"].type == "cuda"
    assert seen["amp"] is True and seen["scaler"] is True  # autocast + GradScaler on
    assert seen["steps"] == 1 and result.state.step == 1
    assert math.isfinite(seen["loss"]) and seen["loss"] > 0
    assert torch.float16 in seen["dtypes"]  # the convolutions ran under float16 autocast
    before, after = seen["before"], seen["after"]
    assert all(t.is_cuda for t in after.values())
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "the optimiser step left every weight unchanged (a skipped AMP step?)"
    assert all(torch.isfinite(t).all() for t in after.values())

    # the bundle trained on the GPU is what the node loads, on a machine without one
    assert result.bundle_dir is not None
    ds = make_dataset("dx_mono2_explicit", seed=5, rows=128, columns=96, findings={})
    (analysed,) = Analyzer([result.bundle_dir], device="cpu", gradcam=False).analyze([ds])
    probabilities = [f.probability for f in analysed.findings]
    assert probabilities and np.isfinite(probabilities).all()
