"""Which training images each epoch sees, on one process or sharded over ``torchrun`` ranks.

Three modes, for class imbalance:

* ``uniform``: every image once per epoch, shuffled (``DistributedSampler``'s behaviour).
* ``weighted``: as many draws as images, with replacement, each image drawn with
  probability proportional to :func:`inverse_frequency_weights` (rare findings more often).
* ``oversample``: each image repeated :func:`repeat_factors` times (rare findings up to
  ``max_factor`` times), shuffled; an epoch gets longer instead of dropping common images.

The order depends only on ``(seed, epoch)``, never on a global random state, and the
sampler yields ``(index, epoch)`` keys so the dataset can seed each item's augmentation;
together they make a resumed run draw the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

logger = logging.getLogger(__name__)

SAMPLER_MODES = ("uniform", "weighted", "oversample")


def _frequencies(targets: np.ndarray) -> np.ndarray:
    return np.maximum((targets > 0).sum(axis=0), 1) / max(len(targets), 1)


def inverse_frequency_weights(targets: np.ndarray, multi_label: bool = True) -> np.ndarray:
    """Per-image sampling weight: the inverse frequency of its rarest positive label.

    Multi-label images without any positive count as one more group ("no finding"), so
    normal images are neither swamped nor over-represented. Weights sum to 1.
    """
    y = np.asarray(targets) > 0
    if y.ndim != 2 or len(y) == 0:
        raise ValueError(f"targets must be (images, labels), got shape {y.shape}")
    groups = y
    if multi_label:
        groups = np.concatenate([y, ~y.any(axis=1, keepdims=True)], axis=1)
    inverse = 1.0 / _frequencies(groups)
    weights = np.where(groups, inverse[None, :], 0.0).max(axis=1)
    weights[weights == 0] = inverse.min()  # multi-class rows without a class (not expected)
    return weights / weights.sum()


def repeat_factors(
    targets: np.ndarray, multi_label: bool = True, max_factor: int = 4
) -> np.ndarray:
    """Per-image repeat count: ``round(f_max / f_label)`` of its rarest positive label,
    at least 1 and at most ``max_factor`` (f = fraction of images positive for a label)."""
    y = np.asarray(targets) > 0
    freq = _frequencies(y)
    ratio = np.where(y, (freq.max() / freq)[None, :], 1.0).max(axis=1) if y.size else np.ones(0)
    return np.clip(np.rint(ratio), 1, max(1, int(max_factor))).astype(np.int64)


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` with imbalance modes that yields ``(index, epoch)``.

    With ``num_replicas=1`` (the default) it is a plain single-process sampler; under
    ``torchrun`` each rank gets its shard, padded so every rank runs the same number of
    steps (as DistributedSampler does). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        size: int,
        *,
        mode: str = "uniform",
        targets: np.ndarray | None = None,
        multi_label: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        max_factor: int = 4,
    ) -> None:
        if mode not in SAMPLER_MODES:
            raise ValueError(f'sampler "{mode}" must be one of {", ".join(SAMPLER_MODES)}')
        if mode != "uniform" and targets is None:
            raise ValueError(f'sampler "{mode}" needs the training targets')
        self.mode = mode
        self._base = np.arange(size)
        self._weights: torch.Tensor | None = None
        if mode == "weighted":
            weights = inverse_frequency_weights(np.asarray(targets), multi_label)
            self._weights = torch.as_tensor(weights, dtype=torch.float64)
        elif mode == "oversample":
            self._base = np.repeat(
                np.arange(size), repeat_factors(np.asarray(targets), multi_label, max_factor)
            )
        super().__init__(
            range(len(self._base)), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
            seed=seed, drop_last=False,
        )  # fmt: skip

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self._base)
        if self._weights is not None:
            return torch.multinomial(self._weights, n, replacement=True, generator=g).tolist()
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        return [int(self._base[i]) for i in order]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = self._epoch_order()
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        shard = indices[self.rank : self.total_size : self.num_replicas]
        return iter([(int(i), int(self.epoch)) for i in shard])


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: this rank's share of ``range(size)`` (no padding, no shuffle)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
