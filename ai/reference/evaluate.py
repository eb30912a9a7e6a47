"""The one per-label evaluation: what the node's evaluation jobs and ``training evaluate``
both report for one label of one classification model.

The quality officer's scheduled figures (:func:`dicom_node.evaluation.figures.label_figures`)
and ``training evaluate`` (:mod:`training.evaluate`) must agree on the same set; they do
because both call :func:`label_metrics` here instead of keeping a copy each. The decision is
the model's own call (``calls``; by default ``score >= threshold``, the bundle's operating
threshold); AUROC, average precision and the curves use the probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ai.reference.metrics import (
    BinaryMetrics,
    Curve,
    Estimate,
    auroc_estimate,
    average_precision_estimate,
    binary_metrics,
    precision_recall_curve,
    roc_curve,
)


@dataclass
class LabelMetrics:
    """One label of one classification model: counts, operating point, ranking figures."""

    label: str
    threshold: float
    n: int
    n_pos: int
    n_neg: int
    operating_point: BinaryMetrics
    auroc: Estimate
    average_precision: Estimate
    roc: Curve | None = None
    pr: Curve | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "threshold": self.threshold,
            "images": self.n,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "prevalence": self.n_pos / self.n if self.n else None,
        }
        out.update(self.operating_point.as_dict())
        out["auroc"] = self.auroc.as_dict()
        out["average_precision"] = self.average_precision.as_dict()
        return out


def label_metrics(
    label: str, threshold: float, truth: np.ndarray, scores: np.ndarray, *,
    calls: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0, curves: bool = True,
) -> LabelMetrics:  # fmt: skip
    """All figures of one label from 0/1 truth and probabilities.

    ``calls``: the model's positive calls (the node's ``Finding.positive``); None means
    ``scores >= threshold``. The ROC curve needs both classes, the PR curve a positive.
    """
    truth = np.asarray(truth, dtype=int)
    scores = np.asarray(scores, dtype=float)
    if calls is None:
        calls = scores >= threshold
    n_pos = int(truth.sum())
    both = 0 < n_pos < truth.size
    return LabelMetrics(
        label=label,
        threshold=float(threshold),
        n=int(truth.size),
        n_pos=n_pos,
        n_neg=int(truth.size - n_pos),
        operating_point=binary_metrics(truth, np.asarray(calls).astype(int)),
        auroc=auroc_estimate(truth, scores, n_boot=n_boot, seed=seed),
        average_precision=average_precision_estimate(
            truth, scores, n_boot=max(200, n_boot // 2), seed=seed
        ),
        roc=roc_curve(truth, scores) if curves and both else None,
        pr=precision_recall_curve(truth, scores) if curves and n_pos else None,
    )
