"""A tiny, randomly initialised classification bundle for service tests.

Quality is irrelevant here; the thresholds make ``nodule`` always positive (so Grad-CAM,
boxes and heatmaps are exercised) and ``pneumothorax`` never positive.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ai.bundle import BundleMetadata, InputSpec, LabelSpec, NetworkSpec, build_model, save_bundle
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
