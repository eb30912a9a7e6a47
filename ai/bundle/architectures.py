"""The architectures a bundle may name, without torch: classification network names with
their Grad-CAM layers, detection network names and the RetinaNet arguments.

Parsing ``metadata.json`` validates ``network.name`` and ``network.args`` against these, and
the web reads bundle metadata without importing torch, so the tables live here (torch-free)
and the builders (:mod:`ai.networks`, :mod:`ai.detection`) take their names from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ai.types import BundleError

GRADCAM_LAYERS: dict[str, str] = {
    "densenet121": "class_layers.relu",
    # generic DenseNet (MONAI defaults unless the bundle's args say otherwise), e.g. the
    # small demo model: init_features=16, growth_rate=8, block_config=(2, 4, 6, 4)
    "densenet": "class_layers.relu",
    "resnet18": "layer4",
    "resnet50": "layer4",
    # EfficientNet reuses one ``_swish`` module for stem and head; the Grad-CAM hook keeps
    # the last call, which is the head's feature map.
    "efficientnet-b0": "_swish",
}
"""Classification network names (:mod:`ai.networks` builds them) -> default Grad-CAM layer."""


def network_names() -> list[str]:
    """Names a classification bundle's ``network.name`` may use."""
    return sorted(GRADCAM_LAYERS)


def check_network_name(name: str) -> None:
    """BundleError naming the choices when ``name`` is not a classification network."""
    if name not in GRADCAM_LAYERS:
        raise BundleError(
            f'network.name "{name}" is not supported; choose one of {network_names()}'
        )


def default_gradcam_layer(name: str) -> str:
    """The Grad-CAM target layer for a network name (BundleError when unknown)."""
    check_network_name(name)
    return GRADCAM_LAYERS[name]


DETECTION_NETWORKS: tuple[str, ...] = ("retinanet",)
"""Names a detection bundle's ``network.name`` may use."""

BACKBONE_NAMES: tuple[str, ...] = ("resnet10", "resnet18", "resnet34", "resnet50")
"""RetinaNet backbones (:data:`ai.detection.BACKBONES` builds them)."""


@dataclass(frozen=True)
class RetinaNetSpec:
    """The ``network.args`` of a RetinaNet bundle, with this project's defaults.

    Anchors: ``anchor_sizes`` (model pixels, on the first pyramid level) times each
    ``aspect_ratios`` entry r (width / height: ``w = s * sqrt(r)``, ``h = s / sqrt(r)``),
    scaled by ``2 ** level`` on the coarser levels (one level per returned layer, plus
    the extra max-pool level). ``head_convs`` (1..4) shortens MONAI's 4-convolution heads:
    fewer convolutions train much faster on a CPU.
    """

    backbone: str = "resnet18"
    widen_factor: float = 1.0
    conv1_t_size: int = 7
    conv1_t_stride: int = 2
    no_max_pool: bool = False
    returned_layers: tuple[int, ...] = (1, 2)
    fpn_channels: int = 64
    head_convs: int = 4
    anchor_sizes: tuple[float, ...] = (8.0, 12.0, 16.0)
    aspect_ratios: tuple[float, ...] = (1.0,)
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    topk_candidates_per_level: int = 1000
    detections_per_img: int = 20
    atss_candidates: int = 4
    hard_negative_batch: int = 64
    hard_negative_positive_fraction: float = 0.3
    hard_negative_pool: float = 20.0
    hard_negative_min: int = 16

    @property
    def levels(self) -> int:
        return len(self.returned_layers) + 1

    @property
    def size_divisible(self) -> int:
        """Input sides must be multiples of this (the coarsest level's stride)."""
        pool = 1 if self.no_max_pool else 2
        return self.conv1_t_stride * pool * 2 ** (max(self.returned_layers) - 1) * 2

    def base_anchor_shapes(self) -> list[tuple[float, float]]:
        """``(size along axis 0, size along axis 1)`` = (height, width) per anchor."""
        shapes = []
        for size in self.anchor_sizes:
            for ratio in self.aspect_ratios:
                w, h = size * math.sqrt(ratio), size / math.sqrt(ratio)
                shapes.append((h, w))
        return shapes

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> RetinaNetSpec:
        """Validate ``network.args``; unknown keys are an error (a typo must not be ignored)."""
        raw = dict(args or {})
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - names)
        if unknown:
            raise BundleError(
                f"network.args has unknown keys {unknown} for retinanet (known: {sorted(names)})"
            )
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        """Raise :class:`BundleError` naming the first bad argument."""
        rules = [
            (self.backbone in BACKBONE_NAMES, "backbone", f"one of {sorted(BACKBONE_NAMES)}"),
            (0 < self.widen_factor <= 4, "widen_factor", "in (0, 4]"),
            (self.conv1_t_stride in (1, 2), "conv1_t_stride", "1 or 2"),
            (self.conv1_t_size in (3, 5, 7), "conv1_t_size", "3, 5 or 7"),
            (bool(self.returned_layers) and all(1 <= k <= 4 for k in self.returned_layers)
             and list(self.returned_layers) == sorted(set(self.returned_layers)),
             "returned_layers", "increasing layer numbers in 1..4"),
            (self.fpn_channels >= 8 and self.fpn_channels % 8 == 0, "fpn_channels",
             "a multiple of 8 (GroupNorm in the heads uses 8 groups)"),
            (1 <= self.head_convs <= 4, "head_convs", "in 1..4"),
            (bool(self.anchor_sizes) and all(s > 0 for s in self.anchor_sizes), "anchor_sizes",
             "positive sizes in model pixels"),
            (bool(self.aspect_ratios) and all(r > 0 for r in self.aspect_ratios),
             "aspect_ratios", "positive width / height ratios"),
            (0.0 <= self.score_thresh < 1.0, "score_thresh", "in [0, 1)"),
            (0.0 < self.nms_thresh <= 1.0, "nms_thresh", "in (0, 1]"),
            (self.topk_candidates_per_level >= 1, "topk_candidates_per_level", ">= 1"),
            (self.detections_per_img >= 1, "detections_per_img", ">= 1"),
            (self.atss_candidates >= 1, "atss_candidates", ">= 1"),
            (self.hard_negative_batch >= 1, "hard_negative_batch", ">= 1"),
            (0.0 < self.hard_negative_positive_fraction < 1.0,
             "hard_negative_positive_fraction", "in (0, 1)"),
            (self.hard_negative_pool >= 1, "hard_negative_pool", ">= 1"),
            (self.hard_negative_min >= 0, "hard_negative_min", ">= 0"),
        ]  # fmt: skip
        for ok, key, wanted in rules:
            if not ok:
                raise BundleError(
                    f'network.args.{key} = "{getattr(self, key)}" must be {wanted}'
                )


def _coerce(key: str, value: Any, default: Any) -> Any:
    """JSON value -> the field's type (lists -> tuples), or a BundleError naming the key."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, tuple):
            items = list(value) if isinstance(value, list | tuple) else [value]
            kind = type(default[0])
            if any(isinstance(v, bool) or not isinstance(v, int | float)
                   or (kind is int and v != int(v)) for v in items):  # fmt: skip
                raise TypeError
            return tuple(kind(v) for v in items)
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError, OverflowError):
        raise BundleError(f'network.args.{key} = "{value}" has the wrong type') from None
