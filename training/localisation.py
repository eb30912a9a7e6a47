"""Grad-CAM localisation of a classifier in its own input space, for builds that hold the
model and the preprocessed images (the demo build): pointing-game hit rate and heatmap
energy in the lungs per label, on true-positive images, measured with
:mod:`ai.reference.localisation` exactly as ``training evaluate`` and the node measure them
at source resolution.

The maps are the node's: :class:`ai.gradcam.GradCAM` on the bundle's Grad-CAM layer, each
cropped to the letterbox content (the padding is not anatomy), which covers the whole
source image, so normalised image boxes and the lung mask apply to the crop directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ai.gradcam import GradCAM
from ai.pixels import Letterbox
from ai.reference.localisation import (
    TOLERANCE_MODEL_PX,
    ImageLocations,
    LocalisationTally,
    measure,
    summarise,
)


def localise(
    model: nn.Module, target_layer: str, tensors: torch.Tensor, letterboxes: Sequence[Letterbox],
    locations: Sequence[ImageLocations | None], labels: Sequence[str], wanted: np.ndarray,
    *, batch_size: int = 16,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per label, the localisation figures over the images where ``wanted`` (N, K) is true
    (typically: truth positive and the model's call positive, on held-out images).

    ``tensors`` (N, C, S, S) are the model inputs; images without locations (None) or
    without a region for the label are not counted. Returns
    :func:`ai.reference.localisation.summarise` (labels with no such image are absent).
    """
    tallies = {name: LocalisationTally() for name in labels}
    todo = np.asarray(wanted, dtype=bool).copy()
    for i, where in enumerate(locations):
        if where is None:
            todo[i] = False
    if not todo.any():
        return {}
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # no graph before the target layer (see ai.gradcam)
        p.requires_grad_(False)
    cam = GradCAM(model.eval(), target_layer)
    try:
        for start in range(0, len(tensors), batch_size):
            rows = todo[start : start + batch_size]
            if not rows.any():
                continue
            batch = tensors[start : start + batch_size].float()
            logits, activation = cam.forward(batch)
            for (b, k), heat in cam.maps(logits, activation, rows, batch.shape[2:]).items():
                box = letterboxes[start + b]
                content = box.crop(heat)
                tolerance = TOLERANCE_MODEL_PX * max(content.shape) / box.size
                found = measure(content, locations[start + b], labels[k], tolerance)  # type: ignore[arg-type]
                if found is not None:
                    tallies[labels[k]].add(*found)
    finally:
        cam.close()
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    return summarise(tallies)
