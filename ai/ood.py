"""Out-of-distribution scoring at inference, from the forward pass the findings come from.

A :class:`FeatureTap` hooks the gate's layer (:class:`ai.bundle.gate.OodGate`) and keeps the
globally average-pooled map of each forward: the findings' own forward pass gives the
features, so the gate costs no second pass, only a (B, D) x (D, D) product. For a
classifier the layer is the Grad-CAM layer (the last spatial feature map, after its
activation); for the RetinaNet detector it is the backbone body, whose deepest map is
pooled (:func:`feature_layer`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ai.bundle.gate import OodGate
from ai.bundle.metadata import BundleMetadata
from ai.networks import find_layer
from ai.types import ModelIdentity, OodVerdict

DETECTOR_FEATURE_LAYER = "network.feature_extractor.body"
"""The RetinaNet's ResNet stages (:mod:`ai.detection_shims`): their deepest map is pooled."""


def feature_layer(metadata: BundleMetadata) -> str:
    """The module whose pooled output a new gate for this bundle is fitted on."""
    if metadata.task == "detection":
        return DETECTOR_FEATURE_LAYER
    return metadata.target_layer


def _pool(output: object) -> torch.Tensor:
    """(B, C) global average of a (B, C, H, W) map; of the last map of a dict or list."""
    if isinstance(output, Mapping):
        output = list(output.values())[-1]
    elif isinstance(output, list | tuple):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.ndim < 3:
        raise RuntimeError(f"ood feature layer gave {type(output).__name__}, not a feature map")
    return output.detach().float().flatten(2).mean(2)


class FeatureTap:
    """Keeps the pooled output of one layer for every forward while it is hooked.

    Not thread-safe across forwards (the Analyzer's runners hold a lock per batch).
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self._local = threading.local()
        self._handle = find_layer(model, layer).register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> None:
        self._local.pooled = _pool(output)

    def take(self) -> np.ndarray:
        """The (B, D) features of the last forward (float64), then forgets them."""
        pooled = getattr(self._local, "pooled", None)
        if pooled is None:
            raise RuntimeError(f'ood feature layer "{self.layer}" was not called in forward')
        self._local.pooled = None
        return pooled.cpu().numpy().astype(np.float64)

    def close(self) -> None:
        self._handle.remove()


def verdicts(gate: OodGate, features: np.ndarray, model: ModelIdentity) -> list[OodVerdict]:
    """One verdict per row of ``features``."""
    return [OodVerdict(model, float(s), gate.threshold) for s in gate.scores(features)]


def withheld_mask(found: Sequence[OodVerdict | None]) -> np.ndarray:
    """(B,) True where the image is out of distribution (None: the model has no gate)."""
    return np.asarray([v is not None and v.out_of_distribution for v in found], dtype=bool)
