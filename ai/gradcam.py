"""Grad-CAM that back-propagates only from the scores down to the target layer.

``monai.visualize.GradCAM`` runs a full backward pass through the network (about three
forwards' worth of work) to read the gradient at one layer. Here a forward hook hands the
rest of the network a *detached* copy of the target activation that requires grad: the part
before the target layer records no graph at all (the weights are frozen), and
``torch.autograd.grad(score, activation)`` walks only the few layers after it (pooling and
the classifier head for the networks in :mod:`ai.networks`). Same map, at about 1.1x the
cost of a plain forward.

The map for class ``k`` is ``relu(sum_c mean_hw(d score_k / d A_c) * A_c)``, upsampled
bilinearly to the input size (as MONAI's default upsampler does) and scaled to [0, 1] by its
maximum, so an all-zero map stays zero instead of being stretched into noise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ai.networks import find_layer

logger = logging.getLogger(__name__)


class GradCAM:
    """Grad-CAM on one named layer of ``model``; keeps a forward hook for its lifetime.

    Not thread-safe: one forward at a time per instance (the Analyzer holds a lock).
    Modules called several times per forward (EfficientNet's shared ``_swish``) give the
    activation of their *last* call, which is the one nearest the head.
    """

    def __init__(self, model: nn.Module, target_layer: str) -> None:
        self.model = model
        self.target_layer = target_layer
        self._active = False
        self._activation: torch.Tensor | None = None
        self._handle = find_layer(model, target_layer).register_forward_hook(self._hook)

    def close(self) -> None:
        """Remove the hook (the model then runs exactly as without Grad-CAM)."""
        self._handle.remove()

    def _hook(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return output
        leaf = output.detach().requires_grad_(True)
        self._activation = leaf
        return leaf

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; returns (logits with a graph from the target layer, activation)."""
        self._active, self._activation = True, None
        try:
            with torch.enable_grad():
                logits = self.model(x)
        finally:
            self._active = False
        if self._activation is None:
            raise RuntimeError(f'Target layer "{self.target_layer}" was not called in forward')
        activation, self._activation = self._activation, None
        return logits, activation

    @staticmethod
    def class_map(
        logits: torch.Tensor,
        activation: torch.Tensor,
        class_idx: int,
        out_size: Sequence[int],
        *,
        retain_graph: bool = True,
        normalize: bool = True,
    ) -> torch.Tensor:
        """(B, H, W) Grad-CAM of ``class_idx`` for every image of the batch."""
        (grad,) = torch.autograd.grad(
            logits[:, class_idx].sum(), activation, retain_graph=retain_graph
        )
        with torch.no_grad():
            weights = grad.flatten(2).mean(2)[:, :, None, None]
            cam = F.relu((weights * activation).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=tuple(out_size), mode="bilinear", align_corners=False)
            cam = cam[:, 0]
            if normalize:
                peak = cam.flatten(1).amax(1).clamp_min(torch.finfo(cam.dtype).tiny)
                cam = cam / peak[:, None, None]
        return cam

    def __call__(self, x: torch.Tensor, class_idx: int, *, normalize: bool = True) -> torch.Tensor:
        """(B, H, W) map of one class for a batch ``x`` of shape (B, C, H, W)."""
        logits, activation = self.forward(x)
        return self.class_map(
            logits, activation, class_idx, x.shape[2:], retain_graph=False, normalize=normalize
        )

    def maps(
        self, logits: torch.Tensor, activation: torch.Tensor, targets: np.ndarray,
        out_size: Sequence[int],
    ) -> dict[tuple[int, int], np.ndarray]:  # fmt: skip
        """Normalised maps for the (image, class) pairs where ``targets`` (B, K) is true.

        Returns ``{(image_index, class_index): float32 (H, W) map in [0, 1]}``; one gradient
        pass per class that is wanted for any image.
        """
        wanted = [k for k in range(targets.shape[1]) if targets[:, k].any()]
        out: dict[tuple[int, int], np.ndarray] = {}
        for n, k in enumerate(wanted):
            cams = self.class_map(logits, activation, k, out_size, retain_graph=n < len(wanted) - 1)
            cams_np = cams.detach().float().cpu().numpy()
            for b in np.flatnonzero(targets[:, k]):
                out[(int(b), k)] = cams_np[b]
        return out
