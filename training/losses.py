"""Classification losses: sigmoid BCE (multi-label), softmax CE (multi-class), focal variants.

Focal loss (Lin et al. 2017) down-weights easy examples by ``(1 - p_t) ** gamma`` so the
many easy negatives of a rare finding do not drown its few positives; it is MONAI's
:class:`monai.losses.FocalLoss` (sigmoid or softmax). With ``gamma=0`` and no ``alpha`` it
equals BCE / CE. Targets are always float vectors (one-hot for multi-class).

Weighted BCE is CheXNet's loss (Rajpurkar et al. 2017): per label, positives weigh
``|N| / (|P| + |N|)`` and negatives ``|P| / (|P| + |N|)``, with P / N counted on the training
split (``positive_fraction``), so a rare finding's few positives count as much as its many
negatives.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss
from torch import nn

logger = logging.getLogger(__name__)

LOSSES = ("bce", "focal", "weighted-bce")


class ClassificationLoss(nn.Module):
    """``loss(logits, targets)`` averaged over the batch (and labels for multi-label).

    Args:
        multi_label: sigmoid per label (True) or softmax over classes (False).
        kind: ``"bce"`` (BCE / CE), ``"focal"`` or ``"weighted-bce"`` (CheXNet's).
        gamma: focal exponent; alpha: focal positive-class weight (None: unweighted).
        positive_fraction: per-label share of positive training images (weighted-bce).
    """

    def __init__(
        self,
        multi_label: bool = True,
        kind: str = "bce",
        *,
        gamma: float = 2.0,
        alpha: float | None = None,
        positive_fraction: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f'loss "{kind}" must be one of {", ".join(LOSSES)}')
        if kind == "weighted-bce" and (positive_fraction is None or not multi_label):
            raise ValueError("weighted-bce needs multi-label targets and their positive fractions")
        self.positive_fraction = (None if positive_fraction is None
                                  else torch.as_tensor(positive_fraction, dtype=torch.float32))  # fmt: skip
        if gamma < 0 or (alpha is not None and not 0.0 <= alpha <= 1.0):
            raise ValueError(f"focal gamma={gamma} must be >= 0 and alpha={alpha} in [0, 1]")
        self.multi_label, self.kind = multi_label, kind
        self.focal = (
            FocalLoss(gamma=gamma, alpha=alpha, use_softmax=not multi_label, reduction="none")
            if kind == "focal"
            else None
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if self.focal is not None:
            per_item = self.focal(logits, targets)
            # MONAI averages nothing with reduction="none": (batch, classes) terms. Multi-class
            # sums over classes so gamma=0 equals cross-entropy; multi-label averages like BCE.
            return per_item.sum(1).mean() if not self.multi_label else per_item.mean()
        if self.kind == "weighted-bce" and self.positive_fraction is not None:
            frac = self.positive_fraction.to(logits.device)
            weight = targets * (1.0 - frac) + (1.0 - targets) * frac
            return F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets.argmax(dim=1))
