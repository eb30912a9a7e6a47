"""Average precision, ROC and PR curves against values worked by hand (in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ai.reference.metrics import (
    auroc,
    average_precision,
    average_precision_estimate,
    precision_recall_curve,
    roc_curve,
)

# 6 positives, 6 negatives; ranked: .95P .85P .80N .75P .55P .45P .40N .35N .30P .25N .20N .10N
Y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S = np.array([0.95, 0.85, 0.75, 0.55, 0.45, 0.30, 0.80, 0.40, 0.35, 0.25, 0.20, 0.10])


def test_average_precision_by_hand() -> None:
    # precision at each positive's rank: 1/1, 2/2, 3/4, 4/5, 5/6, 6/9; each adds recall 1/6
    expected = (1 + 1 + 3 / 4 + 4 / 5 + 5 / 6 + 6 / 9) / 6
    assert average_precision(Y, S) == pytest.approx(expected)
    assert average_precision([1, 0], [0.9, 0.1]) == 1.0
    # a positive tied with a negative enters with the tie's precision 1/2
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_average_precision_interval_brackets_value() -> None:
    est = average_precision_estimate(Y, S, n_boot=300, seed=1)
    assert est.value == pytest.approx(average_precision(Y, S))
    assert 0.0 <= est.lower <= est.value <= est.upper <= 1.0
    assert average_precision_estimate([1, 1], [0.2, 0.3]).lower == 1.0


def test_roc_curve_points_and_area() -> None:
    curve = roc_curve(Y, S)
    assert (curve.x[0], curve.y[0], curve.thresholds[0]) == (0.0, 0.0, np.inf)
    assert (curve.x[-1], curve.y[-1]) == (1.0, 1.0)
    # at threshold 0.80 (third distinct score): TP 2 of 6, FP 1 of 6
    i = int(np.where(curve.thresholds == 0.80)[0][0])
    assert (curve.x[i], curve.y[i]) == pytest.approx((1 / 6, 2 / 6))
    assert np.trapezoid(curve.y, curve.x) == pytest.approx(auroc(Y, S))  # 30 / 36
    assert auroc(Y, S) == pytest.approx(30 / 36)
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_curve([1, 1], [0.1, 0.2])


def test_precision_recall_curve_points() -> None:
    curve = precision_recall_curve(Y, S)
    assert (curve.x[0], curve.y[0]) == (0.0, 1.0)
    i = int(np.where(curve.thresholds == 0.30)[0][0])  # 6 TP, 3 FP above 0.30
    assert (curve.x[i], curve.y[i]) == pytest.approx((1.0, 6 / 9))
    assert curve.y[-1] == pytest.approx(0.5)  # everything called positive: prevalence
    with pytest.raises(ValueError, match="positive cases"):
        precision_recall_curve([0, 0], [0.1, 0.2])
