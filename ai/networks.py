"""MONAI classification networks by name, as a bundle's ``network`` section names them.

Only ``monai.networks.nets`` (no torchvision). Each entry also knows its default Grad-CAM
target layer: the last spatial feature map before global pooling, after its activation
(the layer names are MONAI's own module paths, checked against MONAI 1.6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from monai.networks import nets
from torch import nn

from ai.bundle.architectures import check_network_name, default_gradcam_layer, network_names
from ai.types import BundleError

logger = logging.getLogger(__name__)


class BuiltNetwork(NamedTuple):
    """A freshly built network and the module name Grad-CAM should hook by default."""

    module: nn.Module
    gradcam_layer: str


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    fixed: Callable[[int, int], dict[str, Any]]  # arguments the node owns: classes, channels


def _densenet_fixed(num_classes: int, channels: int) -> dict[str, Any]:
    return {"spatial_dims": 2, "in_channels": channels, "out_channels": num_classes}


def _resnet_fixed(num_classes: int, channels: int) -> dict[str, Any]:
    return {"spatial_dims": 2, "n_input_channels": channels, "num_classes": num_classes}


def _efficientnet_fixed(num_classes: int, channels: int) -> dict[str, Any]:
    return {
        "model_name": "efficientnet-b0",
        "spatial_dims": 2,
        "in_channels": channels,
        "num_classes": num_classes,
        "pretrained": False,  # pretrained weights need a download the node must never do
    }


NETWORKS: dict[str, _Entry] = {  # names and Grad-CAM layers: ai.bundle.architectures
    "densenet121": _Entry(nets.DenseNet121, _densenet_fixed),
    "densenet": _Entry(nets.DenseNet, _densenet_fixed),
    "resnet18": _Entry(nets.resnet18, _resnet_fixed),
    "resnet50": _Entry(nets.resnet50, _resnet_fixed),
    "efficientnet-b0": _Entry(nets.EfficientNetBN, _efficientnet_fixed),
}
assert sorted(NETWORKS) == network_names()  # every name a bundle may use can be built


def _entry(name: str) -> _Entry:
    check_network_name(name)
    return NETWORKS[name]


def build_network(
    name: str, args: Mapping[str, Any] | None = None, *, num_classes: int, in_channels: int = 1
) -> BuiltNetwork:
    """Build ``name`` for 2-D input of ``in_channels`` (the bundle's ``input.channels``: 3 for
    imported ImageNet-pretrained models) and ``num_classes`` outputs.

    ``args`` are the bundle's extra constructor arguments (e.g. ``block_config`` for the small
    demo DenseNet). The spatial dimensions, input channels and number of outputs belong to
    the node and the label list; an ``args`` entry that contradicts them is an error.
    """
    entry = _entry(name)
    if num_classes < 1:
        raise BundleError(f"num_classes must be >= 1, got {num_classes}")
    fixed = entry.fixed(num_classes, in_channels)
    kwargs: dict[str, Any] = dict(args or {})
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise BundleError(f'network.args.{key} = "{kwargs[key]}" conflicts with {value!r}')
        kwargs[key] = value
    if "block_config" in kwargs:  # JSON gives lists; MONAI wants a sequence of ints
        kwargs["block_config"] = tuple(int(v) for v in kwargs["block_config"])
    try:
        module = entry.factory(**kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f'network "{name}" rejects args {dict(args or {})}: {exc}') from exc
    return BuiltNetwork(module, default_gradcam_layer(name))


def find_layer(module: nn.Module, layer_name: str) -> nn.Module:
    """The named submodule, or a BundleError naming the bad ``gradcam_layer``."""
    for name, sub in module.named_modules():
        if name == layer_name:
            return sub
    raise BundleError(f'gradcam_layer "{layer_name}" is not a module of the network')
