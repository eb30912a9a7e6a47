"""Tiny, randomly initialised bundles for service and model tests.

Quality is irrelevant here. The classifier's thresholds make ``nodule`` always positive (so
Grad-CAM, boxes and heatmaps are exercised) and ``pneumothorax`` never positive; the
detector (quarter-width ResNet-10, 16-channel FPN, one head convolution) reports confident
boxes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ai.bundle.load import build_model, save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import default_code
from ai.types import CodedConcept

LABELS = [
    ("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.0),
    ("cardiomegaly", CodedConcept("287272002", "SCT", "Cardiomegaly"), 0.5),
    ("pneumothorax", CodedConcept("36118008", "SCT", "Pneumothorax"), 1.0),
]


def make_tiny_bundle(directory: Path, *, version: str = "0.0.1", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    meta = BundleMetadata(
        name="tiny-test-classifier",
        version=version,
        labels=tuple(LabelSpec(n, c, t) for n, c, t in LABELS),
        network=NetworkSpec("densenet", {"init_features": 8, "growth_rate": 4,
                                         "block_config": [1, 1, 1, 1]}),
        input=InputSpec(size=64),
        demo=True,
        description="random weights, for tests only",
    )
    save_bundle(directory, meta, build_model(meta))
    return directory


TINY_DETECTOR = {"backbone": "resnet10", "widen_factor": 0.25, "fpn_channels": 16,
                 "head_convs": 1, "anchor_sizes": [16, 32], "detections_per_img": 3}  # fmt: skip


def make_detector_bundle(directory: Path, *, bias: float = 6.0, threshold: float = 0.5,
                         size: int = 64) -> Path:
    """A random detector whose every anchor scores sigmoid(bias): NMS keeps 3 boxes."""
    torch.manual_seed(0)
    meta = BundleMetadata(
        name="tiny-test-detector", version="0.0.1", task="detection",
        labels=(LabelSpec("nodule", default_code("nodule"), threshold),),  # type: ignore[arg-type]
        network=NetworkSpec("retinanet", TINY_DETECTOR), input=InputSpec(size=size), demo=True,
    )  # fmt: skip
    model = build_model(meta)
    with torch.no_grad():
        model.network.classification_head.cls_logits.bias.fill_(bias)
    save_bundle(directory, meta, model)
    return directory
