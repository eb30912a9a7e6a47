"""MONAI RetinaNet detectors for chest radiographs, built from a bundle's ``network`` section.

A detection bundle names ``network: {"name": "retinanet", "args": {...}}``; :class:`RetinaNetSpec`
validates the arguments (errors name the key and the bad value) and :func:`build_detector`
turns them into a :class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector`:
2-D, one input channel, a MONAI ResNet backbone with a feature pyramid
(:mod:`ai.detection_shims`: no torchvision), anchors of the given sizes and aspect ratios
on every pyramid level, MONAI's box coder, and the box selector's score threshold, NMS
threshold and detections per image from the same arguments.

Coordinates. MONAI orders box coordinates by array axis: ``(axis0_min, axis1_min,
axis0_max, axis1_max)`` = ``(row0, col0, row1, col1)`` for a ``(B, C, H, W)`` image. Every
other part of this project uses ``(x0, y0, x1, y1)`` = ``(col0, row0, col1, row1)`` in
pixel-edge coordinates. :func:`to_monai_boxes` and :func:`from_monai_boxes` are the only
places where the axes swap; :class:`Detections` is always ``(x0, y0, x1, y1)`` in model
pixels (the letterboxed square of :mod:`ai.pixels`).

Weights: ``RetinaNetDetector.state_dict()`` holds exactly the network's parameters
(``network.*``), so a bundle's ``model.pt`` loads into a freshly built detector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.nets import resnet as monai_resnet

from ai import detection_shims
from ai.types import BundleError

logger = logging.getLogger(__name__)

DETECTION_NETWORKS: tuple[str, ...] = ("retinanet",)
"""Names a detection bundle's ``network.name`` may use."""

BACKBONES: dict[str, Any] = {
    "resnet10": monai_resnet.resnet10,
    "resnet18": monai_resnet.resnet18,
    "resnet34": monai_resnet.resnet34,
    "resnet50": monai_resnet.resnet50,
}


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
            (self.backbone in BACKBONES, "backbone", f"one of {sorted(BACKBONES)}"),
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


def _backbone(spec: RetinaNetSpec) -> monai_resnet.ResNet:
    return BACKBONES[spec.backbone](
        pretrained=False,
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=spec.conv1_t_size,
        conv1_t_stride=spec.conv1_t_stride,
        no_max_pool=spec.no_max_pool,
        widen_factor=spec.widen_factor,
        feed_forward=False,
    )


def build_detector(args: Mapping[str, Any] | None, *, num_classes: int) -> RetinaNetDetector:
    """A freshly initialised RetinaNet detector for ``num_classes`` labels (inference-ready).

    Training additionally needs :func:`ai.detection_shims.configure_training` (done by
    :func:`configure_for_training`).
    """
    if num_classes < 1:
        raise BundleError(f"num_classes must be >= 1, got {num_classes}")
    spec = RetinaNetSpec.from_args(args)
    detection_shims.install()
    extractor = detection_shims.ResNetFPNExtractor(
        _backbone(spec), spec.returned_layers, spec.fpn_channels, spatial_dims=2
    )
    shapes = spec.base_anchor_shapes()
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(spec.levels)],
        base_anchor_shapes=shapes,
        indexing="ij",
    )
    network = RetinaNet(
        spatial_dims=2,
        num_classes=num_classes,
        num_anchors=len(shapes),
        feature_extractor=extractor,
        size_divisible=spec.size_divisible,
    )
    if spec.head_convs < 4:
        for head in (network.classification_head, network.regression_head):
            head.conv = head.conv[: 3 * spec.head_convs]  # (conv, GroupNorm, ReLU) per block
    detector = RetinaNetDetector(network, anchors)
    detector.set_box_selector_parameters(
        score_thresh=spec.score_thresh,
        topk_candidates_per_level=spec.topk_candidates_per_level,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
        apply_sigmoid=True,
    )
    return detector


def configure_for_training(detector: RetinaNetDetector, args: Mapping[str, Any] | None) -> None:
    """ATSS matcher and hard negative sampler with the bundle's settings."""
    spec = RetinaNetSpec.from_args(args)
    detection_shims.configure_training(
        detector,
        atss_candidates=spec.atss_candidates,
        batch_size_per_image=spec.hard_negative_batch,
        positive_fraction=spec.hard_negative_positive_fraction,
        pool_size=spec.hard_negative_pool,
        min_neg=spec.hard_negative_min,
    )


# --------------------------------------------------------------------------------------------
# Boxes in and out


def to_monai_boxes(xyxy: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` ``(x0, y0, x1, y1)`` -> MONAI's ``(row0, col0, row1, col1)`` float tensor."""
    boxes = torch.as_tensor(xyxy, dtype=torch.float32).reshape(-1, 4)
    return boxes[:, [1, 0, 3, 2]].contiguous()


def from_monai_boxes(boxes: torch.Tensor | np.ndarray) -> np.ndarray:
    """MONAI ``(row0, col0, row1, col1)`` -> ``(N, 4)`` float64 ``(x0, y0, x1, y1)``."""
    arr = torch.as_tensor(boxes).detach().float().cpu().numpy().reshape(-1, 4)
    return arr[:, [1, 0, 3, 2]].astype(np.float64)


@dataclass(frozen=True)
class Detections:
    """One image's detections in model pixels: boxes ``(N, 4)`` x0 y0 x1 y1, scores, labels."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))


def unpack(outputs: Sequence[Mapping[str, torch.Tensor]], detector: RetinaNetDetector) -> list[Detections]:
    """The detector's eval-mode output -> :class:`Detections` per image, best score first."""
    found = []
    for out in outputs:
        scores = out[detector.pred_score_key].detach().float().cpu().numpy().astype(np.float64)
        order = np.argsort(-scores, kind="stable")
        found.append(
            Detections(
                boxes=from_monai_boxes(out[detector.target_box_key])[order],
                scores=scores[order],
                labels=out[detector.target_label_key].detach().cpu().numpy().astype(np.int64)[order],
            )
        )
    return found


@torch.inference_mode()
def detect(detector: RetinaNetDetector, images: torch.Tensor) -> list[Detections]:
    """Run ``detector`` (eval mode) on a ``(B, 1, S, S)`` batch; boxes in model pixels."""
    if detector.training:
        raise RuntimeError("detect() needs the detector in eval mode")
    return unpack(detector(images), detector)
