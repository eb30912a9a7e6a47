"""Grad-CAM with the gradient only down to the target layer equals MONAI's full-backward one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from aihelpers import SMALL_DENSENET
from monai.visualize import GradCAM as MonaiGradCAM
from torch import nn

from ai.gradcam import GradCAM
from ai.networks import build_network


def _model(name: str, args: dict | None = None) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    module, layer = build_network(name, args or {}, num_classes=5)
    return module.eval(), layer


def _monai_map(model: nn.Module, layer: str, x: torch.Tensor, k: int) -> torch.Tensor:
    cam = MonaiGradCAM(copy.deepcopy(model), target_layers=layer, postprocessing=lambda t: t)
    return cam(x, class_idx=k)[:, 0]


@pytest.mark.parametrize(
    ("name", "args", "side"),
    [("densenet", SMALL_DENSENET, 64), ("resnet18", {}, 64), ("densenet121", {}, 64)],
)
def test_matches_monai_gradcam(name: str, args: dict, side: int) -> None:
    model, layer = _model(name, args)
    x = torch.rand(3, 1, side, side, generator=torch.Generator().manual_seed(1))
    frozen = copy.deepcopy(model).requires_grad_(False)
    cam = GradCAM(frozen, layer)
    for k in (0, 3):
        ours = cam(x, k, normalize=False)
        ref = _monai_map(model, layer, x, k)
        assert ours.shape == (3, side, side)
        torch.testing.assert_close(
            ours, ref, rtol=1e-4, atol=1e-6 * float(ref.detach().abs().max())
        )


def test_maps_for_selected_pairs_are_normalised() -> None:
    model, layer = _model("densenet", SMALL_DENSENET)
    model.requires_grad_(False)
    cam = GradCAM(model, layer)
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    logits, activation = cam.forward(x)
    assert activation.is_leaf  # nothing before the target layer is in the graph
    targets = np.array([[True, False, False, False, True], [False, False, False, False, True]])
    maps = cam.maps(logits, activation, targets, (48, 48))
    assert set(maps) == {(0, 0), (0, 4), (1, 4)}
    for m in maps.values():
        assert m.shape == (48, 48) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0
    expected = cam(x, 4)[1].numpy()
    np.testing.assert_allclose(maps[(1, 4)], expected, atol=1e-6)


def test_shared_module_uses_last_call() -> None:
    """EfficientNet calls one ``_swish`` for stem and head: the head's map is the one wanted."""
    model, layer = _model("efficientnet-b0")
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    # reference: full backward, gradient of the head activation (the last _swish call)
    ref_model = copy.deepcopy(model)
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen.append(out)

    ref_model._swish.register_forward_hook(keep)
    ref_model(x)[:, 2].sum().backward()
    act = seen[-1]
    weights = act.grad.mean((2, 3), keepdim=True)
    ref = torch.relu((weights * act).sum(1, keepdim=True)).detach()
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear")[:, 0]
    ours = GradCAM(model.requires_grad_(False), layer)(x, 2, normalize=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_hook_is_inert_outside_forward() -> None:
    model, layer = _model("densenet", SMALL_DENSENET)
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        plain = model(x)
    cam = GradCAM(model, layer)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain)
    cam.close()
