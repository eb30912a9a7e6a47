"""Evaluation plots per model and label: a classifier's and a detector's "nodule" are two
series, never one line across models (which drew a vertical jump from 0.556 to 1.0 and an
x-axis from 2025 to 2029). Checked on the matplotlib figures' data and on the page and the
query that feed them."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import pytest
from matplotlib.dates import num2date
from webdata import WebEnv, insert_run, login

from dicom_node.web import evaluation_queries as eq
from dicom_node.web import plots

pytest_plugins = ["webfixtures"]

JOB = "two-models"
CLASSIFIER = ("cxr-demo-classifier", "1.0.0")
DETECTOR = ("cxr-demo-detector", "1.0.0")
DAY = 86400.0


def _series(ax: Any) -> dict[str, list[float]]:
    """Legend name -> y values of each model line of one panel (no floor, no band)."""
    return {line.get_label(): [float(y) for y in line.get_ydata()]
            for line in ax.get_lines() if line.get_gid() == "series"}


@pytest.fixture
def two_models(web_env: WebEnv) -> WebEnv:
    """Three runs of one job that measured both demo bundles, both with a "nodule"."""
    now = time.time()
    for days, cls, det in ((3, (0.9, 0.6), (1.0, 0.556)), (2, (0.8, 0.7), (1.0, 0.6)),
                           (1, (0.85, 0.65), (0.95, 0.62))):
        insert_run(web_env.engine, JOB, now - days * DAY,
                   {"nodule": cls, "cardiomegaly": (0.7, 0.8)}, model=CLASSIFIER,
                   more_models={DETECTOR: {"nodule": det}})
    return web_env


def test_history_query_and_figure_keep_models_apart(two_models: WebEnv) -> None:
    with two_models.engine.connect() as conn:
        both = eq.label_history(conn, "nodule", job=JOB, model=None, started_from=None,
                                started_to=None, limit=200)
        detector = eq.label_history(conn, "nodule", job=JOB, model=DETECTOR[0],
                                    started_from=None, started_to=None, limit=200)
    assert len(both) == 6 and {p["model_name"] for p in detector} == {DETECTOR[0]}
    fig = plots.history_figure("nodule", both, {"sensitivity": 0.8})
    sens, spec = fig.axes[:2]
    assert _series(sens) == {"cxr-demo-classifier 1.0.0": [0.9, 0.8, 0.85],
                             "cxr-demo-detector 1.0.0": [1.0, 1.0, 0.95]}
    assert _series(spec) == {"cxr-demo-classifier 1.0.0": [0.6, 0.7, 0.65],
                             "cxr-demo-detector 1.0.0": [0.556, 0.6, 0.62]}
    legend = [t.get_text() for t in sens.get_legend().get_texts()]
    assert legend == ["cxr-demo-classifier 1.0.0", "cxr-demo-detector 1.0.0", "floor 0.80"]
    low, high = (num2date(x) for x in sens.get_xlim())
    assert high - low < timedelta(days=4)  # the three runs, not years
    one = plots.history_figure("nodule", detector, {})
    assert list(_series(one.axes[0])) == ["cxr-demo-detector 1.0.0"]
    assert one.get_suptitle() == "cxr-demo-detector / nodule"
    assert [ax.get_title() for ax in one.axes] == ["sensitivity", "specificity"]


def test_a_single_run_of_two_models_is_two_points_on_a_two_day_axis(
        two_models: WebEnv) -> None:
    with two_models.engine.connect() as conn:
        points = eq.label_history(conn, "nodule", job=JOB, model=None, started_from=None,
                                  started_to=None, limit=2)  # the latest run only
    assert {p["started_at"] for p in points} == {points[0]["started_at"]}
    ax = plots.history_figure("nodule", points, {}).axes[0]
    assert sorted(len(v) for v in _series(ax).values()) == [1, 1]
    low, high = (num2date(x) for x in ax.get_xlim())
    assert high - low == timedelta(days=2)


def test_roc_legend_names_model_and_label(two_models: WebEnv) -> None:
    with two_models.engine.connect() as conn:
        run = eq.get_run(conn, eq.list_runs(conn, job=JOB, kind=None, state=None,
                                            started_from=None, started_to=None, limit=1,
                                            offset=0)[0][0]["id"])
    assert run is not None
    ax = plots.roc_figure(run["metrics"]).axes[0]
    curves = [line.get_label() for line in ax.get_lines() if line.get_gid() == "roc"]
    assert curves == ["cxr-demo-classifier 1.0.0 / cardiomegaly (AUROC 0.88)",
                      "cxr-demo-classifier 1.0.0 / nodule (AUROC 0.88)",
                      "cxr-demo-detector 1.0.0 / nodule (AUROC 0.88)"]
    assert len([x for x in ax.get_lines() if x.get_gid() == "operating-point"]) == 3


def test_evaluation_page_has_one_plot_and_row_per_model_and_label(two_models: WebEnv) -> None:
    login(two_models)
    page = two_models.client.get(f"/dashboard/evaluation?job={JOB}").text
    srcs = re.findall(r'<img class="history" src="([^"]+)"', page)
    assert [s.replace("&amp;", "&") for s in srcs] == [
        f"/dashboard/evaluation/history.png?job={JOB}&model=cxr-demo-classifier&label="
        f"{label}" for label in ("cardiomegaly", "nodule")] + [
        f"/dashboard/evaluation/history.png?job={JOB}&model=cxr-demo-detector&label=nodule"]
    rows = re.findall(r'<td class="small">(cxr-demo-\w+ 1\.0\.0)</td>\s*<td>(\w+)</td>', page)
    assert rows == [("cxr-demo-classifier 1.0.0", "cardiomegaly"),
                    ("cxr-demo-classifier 1.0.0", "nodule"),
                    ("cxr-demo-detector 1.0.0", "nodule")]
    for src in srcs:
        resp = two_models.client.get(src.replace("&amp;", "&"))
        assert resp.status_code == 200 and resp.data[:4] == b"\x89PNG"
