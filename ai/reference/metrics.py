"""Diagnostic-accuracy figures with confidence intervals, shared by training and the node.

Proportions (sensitivity, specificity, PPV, NPV) get Wilson score intervals: unlike the
normal approximation they stay inside [0, 1] and behave at 0 or n successes, which is
where a safety officer looks. F1 is not a binomial proportion, so its interval comes from a
bootstrap of the confusion matrix (multinomial resampling of its four cells, the same as
resampling the cases). AUROC is the Mann-Whitney statistic (ties count one half) with a
stratified bootstrap interval (each resample keeps the case mix).

Convention everywhere: a case is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

logger = logging.getLogger(__name__)

Z95 = float(norm.ppf(0.975))


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its confidence interval (NaN when undefined, e.g. 0 / 0)."""

    value: float
    lower: float
    upper: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else v) for k, v in vars(self).items()}


NAN_ESTIMATE = Estimate(math.nan, math.nan, math.nan)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """Proportion ``successes / n`` with its Wilson score interval."""
    if n <= 0:
        return NAN_ESTIMATE
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lower = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, no 0.99999...
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, lower, upper)


def _as_binary(y_true: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be a 1-D array of 0/1 labels")
    return y.astype(bool)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of a binary decision against the reference."""

    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def from_predictions(cls, y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> ConfusionMatrix:  # fmt: skip
        truth, pred = _as_binary(y_true), _as_binary(y_pred)
        if truth.shape != pred.shape:
            raise ValueError(f"y_true {truth.shape} and y_pred {pred.shape} differ in shape")
        return cls(
            tp=int(np.sum(truth & pred)),
            fp=int(np.sum(~truth & pred)),
            tn=int(np.sum(~truth & ~pred)),
            fn=int(np.sum(truth & ~pred)),
        )

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def f1_estimate(cm: ConfusionMatrix, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """F1 with a percentile bootstrap interval from multinomial resampling of ``cm``."""
    value = float(_f1(np.asarray(cm.tp), np.asarray(cm.fp), np.asarray(cm.fn)))
    if cm.n == 0 or math.isnan(value):
        return NAN_ESTIMATE
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(cm.n, np.asarray([cm.tp, cm.fp, cm.tn, cm.fn]) / cm.n, size=n_boot)
    boot = _f1(cells[:, 0], cells[:, 1], cells[:, 3])
    boot = boot[~np.isnan(boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if boot.size else (math.nan, math.nan)
    return Estimate(value, float(lo), float(hi))


@dataclass(frozen=True)
class BinaryMetrics:
    """The operating-point figures of one label at one threshold."""

    confusion: ConfusionMatrix
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    f1: Estimate

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = dict(vars(self.confusion))
        for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            out[name] = getattr(self, name).as_dict()
        return out


def binary_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray
) -> BinaryMetrics:
    """Sensitivity, specificity, PPV, NPV (Wilson 95% CIs) and F1 (bootstrap 95% CI)."""
    cm = ConfusionMatrix.from_predictions(y_true, y_pred)
    return BinaryMetrics(
        confusion=cm,
        sensitivity=wilson_interval(cm.tp, cm.tp + cm.fn),
        specificity=wilson_interval(cm.tn, cm.tn + cm.fp),
        ppv=wilson_interval(cm.tp, cm.tp + cm.fp),
        npv=wilson_interval(cm.tn, cm.tn + cm.fn),
        f1=f1_estimate(cm),
    )


def binary_metrics_at(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> BinaryMetrics:
    """:func:`binary_metrics` for ``scores >= threshold``."""
    return binary_metrics(y_true, (np.asarray(scores, dtype=float) >= threshold).astype(int))


def _scores(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    truth = _as_binary(y_true)
    s = np.asarray(scores, dtype=float)
    if s.shape != truth.shape:
        raise ValueError(f"scores {s.shape} and y_true {truth.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return truth, s


def auroc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie); NaN without both classes."""
    truth, s = _scores(y_true, scores)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks give ties one half
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_batch(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (pos[i], neg[i]) via ranks of the concatenated scores."""
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc_estimate(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """AUROC with a stratified percentile-bootstrap interval."""
    truth, s = _scores(y_true, scores)
    value = auroc(truth.astype(int), s)
    if math.isnan(value):
        return NAN_ESTIMATE
    rng = np.random.default_rng(seed)
    pos, neg = s[truth], s[~truth]
    boot = _auroc_batch(
        pos[rng.integers(0, pos.size, (n_boot, pos.size))],
        neg[rng.integers(0, neg.size, (n_boot, neg.size))],
    )
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi))


def _operating_points(truth: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct thresholds (descending) with the true- and false-positive counts of each."""
    thresholds = np.unique(s)[::-1]
    pos_sorted, neg_sorted = np.sort(s[truth]), np.sort(s[~truth])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    return thresholds, tp, fp


def _between(thresholds: np.ndarray, i: int) -> float:
    """Midpoint between threshold ``i`` and the next lower one, so the calibration cases keep
    their calls but the cut-off does not sit exactly on one case's score."""
    if i + 1 < thresholds.size:
        return float((thresholds[i] + thresholds[i + 1]) / 2)
    return float(thresholds[i])


def youden_threshold(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:  # fmt: skip
    """Threshold maximising J = sensitivity + specificity - 1 (the first, highest, on ties)."""
    truth, s = _scores(y_true, scores)
    if truth.all() or not truth.any():
        raise ValueError("Youden threshold needs both positive and negative cases")
    thresholds, tp, fp = _operating_points(truth, s)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    # J * n_pos * n_neg = tp * n_neg - fp * n_pos: integers, so ties are exact ties
    return _between(thresholds, int(np.argmax(tp * n_neg - fp * n_pos)))


def threshold_for_sensitivity(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float
) -> float:
    """Highest threshold whose sensitivity reaches ``target`` (so specificity is the best
    available at that sensitivity)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    truth, s = _scores(y_true, scores)
    if not truth.any():
        raise ValueError("threshold_for_sensitivity needs positive cases")
    thresholds, tp, _ = _operating_points(truth, s)
    i = int(np.argmax(tp >= target * int(truth.sum()) - 1e-9))
    return _between(thresholds, i)


# --------------------------------------------------------------------------------------------
# Curves and average precision (for evaluation reports and their plots)


@dataclass(frozen=True)
class Curve:
    """Points of a ROC or precision-recall curve, one per distinct threshold (descending).

    ``x``/``y`` are (FPR, TPR) for ROC and (recall, precision) for PR; ``thresholds[i]`` is
    the cut-off (``score >= threshold`` is positive) that gives point ``i``. The ROC curve
    starts at (0, 0) with threshold +inf; the PR curve starts at recall 0, precision 1.
    """

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray


def roc_curve(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> Curve:
    """ROC points (FPR, TPR) at every distinct score; needs both classes."""
    truth, s = _scores(y_true, scores)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both positive and negative cases")
    thresholds, tp, fp = _operating_points(truth, s)
    return Curve(
        x=np.concatenate([[0.0], fp / n_neg]),
        y=np.concatenate([[0.0], tp / n_pos]),
        thresholds=np.concatenate([[np.inf], thresholds]),
    )


def precision_recall_curve(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> Curve:
    """Precision-recall points at every distinct score (descending); needs positive cases."""
    truth, s = _scores(y_true, scores)
    n_pos = int(truth.sum())
    if n_pos == 0:
        raise ValueError("precision_recall_curve needs positive cases")
    thresholds, tp, fp = _operating_points(truth, s)
    return Curve(
        x=np.concatenate([[0.0], tp / n_pos]),
        y=np.concatenate([[1.0], tp / (tp + fp)]),
        thresholds=np.concatenate([[np.inf], thresholds]),
    )


def _average_precision(truth: np.ndarray, s: np.ndarray) -> float:
    thresholds, tp, fp = _operating_points(truth, s)
    recall = tp / int(truth.sum())
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def average_precision(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float:
    """AP = sum over distinct thresholds (descending) of (R_k - R_k-1) * P_k.

    The step-wise area under the PR curve without interpolation (the definition
    scikit-learn uses); cases with tied scores enter together. NaN without positives.
    """
    truth, s = _scores(y_true, scores)
    if not truth.any():
        return math.nan
    return _average_precision(truth, s)


def average_precision_estimate(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """:func:`average_precision` with a stratified percentile-bootstrap interval."""
    truth, s = _scores(y_true, scores)
    if not truth.any():
        return NAN_ESTIMATE
    value = _average_precision(truth, s)
    if truth.all():
        return Estimate(value, value, value)  # every case positive: AP is 1 in every resample
    rng = np.random.default_rng(seed)
    pos, neg = s[truth], s[~truth]
    labels = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    boot = np.empty(n_boot)
    for b in range(n_boot):
        sample = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        boot[b] = _average_precision(labels, sample)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi))
