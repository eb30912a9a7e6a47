"""Per-label figures of a run, from cases (truth, the node's call and its probability).

A *case* is one evaluation unit (an image, or a study when the ground truth is per study)
for one label of one model. The decision is the node's own ``positive`` flag (probability
>= the bundle's operating threshold, as live traffic gets it); AUROC and the ROC curve use
the probability. Proportions get Wilson 95% intervals and AUROC a stratified bootstrap,
both from :mod:`ai.reference.metrics`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ai.codes import normalise_label
from ai.reference.evaluate import label_metrics
from ai.reference.metrics import Estimate
from ai.reference.metrics_detection import (
    ImageBoxes,
    evaluate_boxes,
    findings_to_boxes,
    yolo_truth,
)
from ai.types import Finding, ImageResult

logger = logging.getLogger(__name__)

MAX_ROC_POINTS = 256  # stored per label and run: enough for a plot, small in the database


@dataclass(frozen=True)
class Case:
    """One label's call on one evaluation unit, with the reference truth."""

    model_name: str
    model_version: str
    label: str
    unit: str  # SOP Instance UID or Study Instance UID
    truth: int  # 1 present, 0 absent
    probability: float
    positive: bool
    threshold: float


@dataclass(frozen=True)
class LabelFigures:
    """Everything stored per run, model and label (``evaluation_metrics`` row)."""

    model_name: str
    model_version: str
    label: str
    threshold: float | None
    n_pos: int
    n_neg: int
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    f1: float | None
    auroc: Estimate
    roc: list[tuple[float, float]] = field(default_factory=list)  # (fpr, tpr)
    ap50: float | None = None  # detection only
    froc: list[tuple[float, float]] | None = None  # detection only: (FP per image, sens)
    # Grad-CAM on true positives (classification, references with locations.json):
    # {"hit_rate": {value, lower, upper}, "lung_energy", "tp_images", "hits", ...}
    localisation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None), as the API and the dashboard show it."""
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "model_name", "model_version", "label", "threshold", "n_pos", "n_neg",
            "tp", "fp", "tn", "fn", "f1", "ap50")}
        for name in ("sensitivity", "specificity", "ppv", "npv", "auroc"):
            out[name] = getattr(self, name).as_dict()
        out["roc"] = [list(p) for p in self.roc]
        out["froc"] = None if self.froc is None else [list(p) for p in self.froc]
        out["localisation"] = self.localisation
        return out


def _thin(points: list[tuple[float, float]], limit: int = MAX_ROC_POINTS
          ) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    idx = np.unique(np.linspace(0, len(points) - 1, limit).round().astype(int))
    return [points[i] for i in idx]


def label_figures(cases: Sequence[Case]) -> LabelFigures:
    """Figures of one (model, label) group of cases: :func:`ai.reference.evaluate.label_metrics`
    (the evaluation ``training evaluate`` reports) on the node's own calls, as stored."""
    first = cases[0]
    truth = np.asarray([c.truth for c in cases], dtype=int)
    probs = np.asarray([c.probability for c in cases], dtype=float)
    calls = np.asarray([int(c.positive) for c in cases], dtype=int)
    m = label_metrics(first.label, first.threshold, truth, probs, calls=calls)
    thresholds = {c.threshold for c in cases}
    op = m.operating_point
    f1 = op.f1.value
    cm = op.confusion
    return LabelFigures(
        model_name=first.model_name, model_version=first.model_version, label=first.label,
        threshold=thresholds.pop() if len(thresholds) == 1 else None,
        n_pos=m.n_pos, n_neg=m.n_neg,
        tp=cm.tp, fp=cm.fp, tn=cm.tn, fn=cm.fn,
        sensitivity=op.sensitivity, specificity=op.specificity, ppv=op.ppv, npv=op.npv,
        f1=None if math.isnan(f1) else f1, auroc=m.auroc,
        roc=_thin([(float(a), float(b)) for a, b in zip(m.roc.x, m.roc.y, strict=True)]
                  if m.roc is not None else []),
    )


def compute_figures(cases: Iterable[Case]) -> list[LabelFigures]:
    """One :class:`LabelFigures` per (model, version, label), sorted by those keys."""
    groups: dict[tuple[str, str, str], list[Case]] = defaultdict(list)
    for case in cases:
        groups[(case.model_name, case.model_version, case.label)].append(case)
    return [label_figures(groups[key]) for key in sorted(groups)]


def study_cases(image_cases: Iterable[tuple[str, Case]]) -> list[Case]:
    """Aggregate image-level calls to the study: positive if any image's finding is positive,
    probability = the maximum. Input pairs are (study UID, case with the study's truth)."""
    grouped: dict[tuple[str, str, str, str], list[Case]] = defaultdict(list)
    for study_uid, case in image_cases:
        grouped[(study_uid, case.model_name, case.model_version, case.label)].append(case)
    out = []
    for (study_uid, *_), group in grouped.items():
        best = max(group, key=lambda c: c.probability)
        out.append(Case(best.model_name, best.model_version, best.label, study_uid,
                        best.truth, best.probability, any(c.positive for c in group),
                        best.threshold))
    return out


TruthBox = tuple[str, float, float, float, float]
"""A reference box: (label, x0, y0, x1, y1) in source pixels of its image."""


def detection_figures(results: Sequence[ImageResult],
                      truth: Mapping[str, Sequence[TruthBox]]) -> list[LabelFigures]:
    """Figures of the detection models in ``results`` against reference boxes.

    ``truth`` maps SOP Instance UID -> reference boxes (an empty list: a negative image);
    images it does not name are not evaluated. For each (detection model, label) the row
    holds AP50 (COCO 101-point, IoU >= 0.5) and FROC points (FP per image, lesion
    sensitivity) at 1/8 .. 8 FP per image from :mod:`ai.reference.metrics_detection`, plus the
    image-level call (positive if any box is positive; probability = the best box score,
    0 without a box) with the same sensitivity / specificity / AUROC as classification, so
    floors and alerts work unchanged. Classification findings are ignored here.
    """
    evaluated = [r for r in results if r.sop_instance_uid in truth]
    groups: dict[tuple[str, str, str], list[Finding]] = defaultdict(list)
    for result in evaluated:
        for f in result.findings:
            if f.model.task == "detection":
                groups[(f.model.name, f.model.version, f.label)].append(f)
    out = []
    for (name, version, label), found in sorted(groups.items()):
        uid, threshold = found[0].model.device_uid, found[0].threshold
        cases, preds, refs = [], [], []
        for result in evaluated:
            mine = [f for f in result.findings if f.model.device_uid == uid and f.label == label]
            ref = [b[1:] for b in truth[result.sop_instance_uid]
                   if normalise_label(b[0]) == normalise_label(label)]
            preds.append(findings_to_boxes(mine, [label]))
            refs.append(ImageBoxes(np.asarray(ref, dtype=float).reshape(-1, 4),
                                   np.zeros(len(ref), dtype=np.int64)))
            cases.append(Case(name, version, label, result.sop_instance_uid, int(bool(ref)),
                              max((f.probability for f in mine), default=0.0),
                              any(f.positive for f in mine), threshold))
        boxes = evaluate_boxes(preds, refs, [label], [threshold]).classes[0]
        froc = [(float(r), float(v)) for r, v in zip(boxes.froc.rates, boxes.froc.sensitivity,
                                                     strict=True) if not math.isnan(v)]
        out.append(replace(label_figures(cases), ap50=None if math.isnan(boxes.ap50)
                           else boxes.ap50, froc=froc))
    return out


def reference_boxes(doc: Mapping[str, Sequence[str]], images: Sequence[tuple[str, str, int, int]],
                    classes: Sequence[str]) -> dict[str, list[TruthBox]]:
    """The ``truth`` of :func:`detection_figures` from a YOLO JSON map (``boxes.json``).

    ``images``: (SOP Instance UID, path relative to the reference folder, rows, columns);
    ``classes``: the map's class names in index order (``classes.txt``). Images the map does
    not name are left out (not evaluated); an empty list in the map is a negative image.
    """
    found, notes = yolo_truth(doc, [(path, rows, cols) for _, path, rows, cols in images], classes)
    if notes:
        logger.info("reference boxes: %s", notes)
    return {
        sop: [(classes[int(k)], *map(float, box)) for box, k in zip(t.boxes, t.labels, strict=True)]
        for (sop, *_), t in zip(images, found, strict=True) if t is not None
    }
