"""Metrics against values computed by hand (worked in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ai.reference.metrics import (
    ConfusionMatrix,
    auroc,
    auroc_estimate,
    binary_metrics,
    binary_metrics_at,
    f1_estimate,
    threshold_for_sensitivity,
    wilson_interval,
    youden_threshold,
)


def test_wilson_8_of_10() -> None:
    # z = 1.959964; denom = 1 + z^2/10 = 1.384146; centre = (0.8 + z^2/20) / denom = 0.716741
    # half = z * sqrt(0.8*0.2/10 + z^2/400) / denom = 0.226534  ->  [0.490, 0.943]
    est = wilson_interval(8, 10)
    assert est.value == 0.8
    assert est.lower == pytest.approx(0.49016, abs=1e-4)
    assert est.upper == pytest.approx(0.94332, abs=1e-4)


def test_wilson_edges() -> None:
    zero = wilson_interval(0, 20)
    assert zero.value == 0.0 and zero.lower == 0.0
    assert zero.upper == pytest.approx(3.8415 / (20 + 3.8415), abs=1e-4)  # z^2 / (n + z^2)
    full = wilson_interval(20, 20)
    assert full.upper == 1.0 and full.lower == pytest.approx(20 / (20 + 3.8415), abs=1e-4)
    assert math.isnan(wilson_interval(0, 0).value)
    with pytest.raises(ValueError, match="successes=5"):
        wilson_interval(5, 4)


def test_binary_metrics_counts_and_ratios() -> None:
    # 10 positives (8 found), 10 negatives (9 cleared, 1 false alarm)
    y_true = [1] * 10 + [0] * 10
    y_pred = [1] * 8 + [0] * 2 + [0] * 9 + [1]
    m = binary_metrics(y_true, y_pred)
    assert m.confusion == ConfusionMatrix(tp=8, fp=1, tn=9, fn=2)
    assert m.sensitivity.value == 0.8
    assert m.specificity.value == 0.9
    assert m.ppv.value == pytest.approx(8 / 9)
    assert m.npv.value == pytest.approx(9 / 11)
    assert m.f1.value == pytest.approx(16 / 19)  # 2TP / (2TP + FP + FN)
    assert m.f1.lower < m.f1.value < m.f1.upper
    assert m.sensitivity.lower == pytest.approx(0.49016, abs=1e-4)
    assert m.as_dict()["tp"] == 8


def test_binary_metrics_at_threshold_uses_ge() -> None:
    m = binary_metrics_at([1, 0, 1], [0.5, 0.49, 0.7], 0.5)
    assert m.confusion == ConfusionMatrix(tp=2, fp=0, tn=1, fn=0)


def test_f1_undefined_without_positives() -> None:
    assert math.isnan(f1_estimate(ConfusionMatrix(0, 0, 5, 0)).value)


def test_auroc_hand_computed() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 = 3 of 4
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert auroc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))


def test_auroc_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50, int), np.zeros(50, int)]
    s = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 50)]
    est = auroc_estimate(y, s, n_boot=500)
    assert est.value == auroc(y, s)
    assert est.lower < est.value < est.upper
    assert 0.1 < est.upper - est.lower < 0.3
    perfect = auroc_estimate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=100)
    assert (perfect.value, perfect.lower, perfect.upper) == (1.0, 1.0, 1.0)


def test_youden_threshold() -> None:
    # thresholds (desc) 0.9 0.7 0.6 0.4 0.2 0.1 -> J = 1/3, 2/3, 1/3, 2/3, 1/3, 0
    # first maximum at 0.7; the cut sits half-way to the next score: (0.7 + 0.6) / 2
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    assert youden_threshold(y, s) == pytest.approx(0.65)
    with pytest.raises(ValueError, match="both positive and negative"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_threshold_for_target_sensitivity() -> None:
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    # sensitivity 1.0 first reached at 0.4 -> (0.4 + 0.2) / 2
    assert threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.3)
    # 2/3 reached at 0.7 -> (0.7 + 0.6) / 2
    assert threshold_for_sensitivity(y, s, 0.6) == pytest.approx(0.65)
    m = binary_metrics_at(y, s, threshold_for_sensitivity(y, s, 1.0))
    assert m.sensitivity.value == 1.0 and m.specificity.value == pytest.approx(2 / 3)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="0/1 labels"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in shape"):
        auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="finite"):
        auroc([0, 1], [0.1, float("nan")])
