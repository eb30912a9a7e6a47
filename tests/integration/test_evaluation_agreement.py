"""``training evaluate`` and the node's reference job report the same per-label figures on
the same set: they call the same function (asserted by identity) and give the same values
(both run on one phantom set with one bundle, every figure compared)."""

from __future__ import annotations

from pathlib import Path

import pytest

import ai.reference.evaluate as core
import dicom_node.evaluation.figures as node_figures
import training.evaluate as training_evaluate
import training.results as training_results
from ai.inference import Analyzer
from dicom_node.config import SelectionSettings
from dicom_node.evaluation.figures import compute_figures
from dicom_node.evaluation.reference import evaluate_reference
from training.evaluate import evaluate_predictions, load_labelled_set, predict
from training.synth import ANALYSABLE_VARIANTS, synthesize


def test_both_sides_call_the_one_per_label_evaluation() -> None:
    assert node_figures.label_metrics is core.label_metrics
    assert training_evaluate.label_metrics is core.label_metrics
    assert training_results.LabelMetrics is core.LabelMetrics


def test_training_evaluate_and_the_reference_job_give_identical_figures(
        tmp_path: Path, tiny_bundle: Path) -> None:
    data = tmp_path / "set"
    synthesize(data, 6, seed=5, size=(192, 160), variants=list(ANALYSABLE_VARIANTS),
               prevalence=0.5)
    labels = data / "labels.csv"
    analyzer = Analyzer([tiny_bundle], device="cpu", gradcam=False)

    labelled = load_labelled_set(data, labels)
    found = predict(analyzer, labelled.images, batch_size=8)
    report = evaluate_predictions(found, labelled, models=analyzer.models)
    (model,) = report.models
    trained = {m.label: m for m in model.labels}

    outcome = evaluate_reference(data, labels, analyzer,
                                 SelectionSettings(min_rows=1, min_columns=1))
    node = {f.label: f for f in compute_figures(outcome.cases)}

    assert set(node) == set(trained) and node
    for label, f in node.items():
        m = trained[label]
        op = m.operating_point
        cm = op.confusion
        assert (f.n_pos, f.n_neg, f.tp, f.fp, f.tn, f.fn) == (
            m.n_pos, m.n_neg, cm.tp, cm.fp, cm.tn, cm.fn), label
        assert f.threshold == m.threshold
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            assert getattr(f, name) == getattr(op, name), (label, name)
        assert f.f1 == pytest.approx(op.f1.value, nan_ok=True)
        assert f.auroc.as_dict() == pytest.approx(m.auroc.as_dict(), nan_ok=True), label
        expected_roc = ([] if m.roc is None else
                        [(float(a), float(b)) for a, b in zip(m.roc.x, m.roc.y, strict=True)])
        assert f.roc == expected_roc, label
