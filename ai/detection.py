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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.nets import resnet as monai_resnet

from ai import detection_shims
from ai.bundle.architectures import BACKBONE_NAMES, RetinaNetSpec
from ai.types import BundleError

logger = logging.getLogger(__name__)

BACKBONES: dict[str, Any] = {
    "resnet10": monai_resnet.resnet10,
    "resnet18": monai_resnet.resnet18,
    "resnet34": monai_resnet.resnet34,
    "resnet50": monai_resnet.resnet50,
}
assert tuple(BACKBONES) == BACKBONE_NAMES  # the torch-free name list says what is built here


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
