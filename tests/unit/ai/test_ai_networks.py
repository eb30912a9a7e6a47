"""Every network name builds for 1-channel 2-D input and names a real Grad-CAM layer."""

from __future__ import annotations

import pytest
import torch
from aihelpers import SMALL_DENSENET

from ai.bundle.architectures import default_gradcam_layer, network_names
from ai.networks import build_network, find_layer
from ai.types import BundleError


@pytest.mark.parametrize("name", network_names())
def test_builds_and_runs(name: str) -> None:
    args = SMALL_DENSENET if name == "densenet" else {}
    module, layer = build_network(name, args, num_classes=3)
    assert layer == default_gradcam_layer(name)
    find_layer(module, layer)
    with torch.inference_mode():
        out = module.eval()(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3)


def test_unknown_network() -> None:
    with pytest.raises(BundleError, match='network.name "vgg16" is not supported'):
        build_network("vgg16", {}, num_classes=2)


def test_args_may_not_contradict_the_node() -> None:
    with pytest.raises(BundleError, match=r"network.args.in_channels = \"3\""):
        build_network("densenet121", {"in_channels": 3}, num_classes=2)


def test_bad_args_are_bundle_errors() -> None:
    with pytest.raises(BundleError, match="rejects args"):
        build_network("resnet18", {"no_such_argument": 1}, num_classes=2)


def test_unknown_layer() -> None:
    module, _ = build_network("densenet", SMALL_DENSENET, num_classes=2)
    with pytest.raises(BundleError, match='gradcam_layer "features.nope"'):
        find_layer(module, "features.nope")
