"""Detection figures: per-class AP at IoU 0.5 and 0.5:0.95, operating point, FROC.

Shared by ``training`` (fit validation, ``training evaluate``) and the node's evaluation
jobs. Plain NumPy: no torch, no MONAI.

Conventions (stated in every report, see :data:`CONVENTIONS`):

* **Matching** (COCO): per image and class, detections in descending score order each
  take the still-unmatched reference box of highest IoU, if that IoU >= the threshold;
  otherwise (or when they hit an already matched box: a duplicate) they are false
  positives. Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates; IoU uses areas
  ``(x1 - x0) * (y1 - y0)``.
* **AP** (COCO 101-point interpolation): detections of all images pooled and sorted by
  score (stable); precision made monotone (the envelope from the right); AP is the mean
  over recall levels 0, 0.01, ..., 1 of the envelope precision at the first point whose
  recall reaches the level (0 where none does). ``mAP50-95`` averages AP over IoU
  thresholds 0.50, 0.55, ..., 0.95. A class without reference boxes has no AP (NaN).
* **Operating point**: the detections with ``score >= threshold`` (the bundle's label
  threshold), matched at IoU 0.5: P = TP / (TP + FP), R = TP / instances.
* **FROC**: lesion sensitivity (matched at IoU 0.5) against mean false positives per
  image over all evaluated images. The sensitivity reported at a rate f is the highest
  reached by any score cut-off with FP / image <= f (a step curve, no interpolation);
  ``cpm`` is the mean of the seven points 1/8 .. 8 (LUNA16's competition metric).

Table (the detection literature's layout): Class, Images (images holding the class),
Instances (reference boxes), P, R, mAP50, mAP50-95, with an ``all`` row first (all images,
all instances, means over the classes that have instances).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ai.codes import normalise_label
from ai.reference.labels import parse_yolo_line

logger = logging.getLogger(__name__)

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_CURVE_POINTS = 256
CONVENTIONS: dict[str, str] = {
    "matching": "COCO greedy: by descending score, each detection takes the unmatched "
    "reference box of highest IoU >= threshold; duplicates are false positives",
    "ap": "COCO 101-point interpolated AP (precision envelope at recall 0:0.01:1)",
    "map50_95": "mean AP over IoU 0.50:0.05:0.95",
    "operating_point": "detections with score >= the label threshold, IoU >= 0.5",
    "froc": "lesion sensitivity at IoU >= 0.5 vs mean FP per image; highest sensitivity "
    "with FP/image <= rate (step curve); cpm = mean of the 7 rates 1/8..8",
    "images": "Images = images holding the class; the 'all' row counts every image",
}


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes on one image: ``(N, 4)`` x0 y0 x1 y1, class indexes, scores (predictions only)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes but {labels.shape[0]} labels")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if scores.shape[0] != boxes.shape[0] or not np.isfinite(scores).all():
                raise ValueError("scores must be finite, one per box")
            object.__setattr__(self, "scores", scores)

    @classmethod
    def empty(cls) -> ImageBoxes:
        return cls(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0))

    def of_class(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, scores) of class ``k``; scores sorted descending (stable), ones for truth."""
        keep = self.labels == k
        boxes = self.boxes[keep]
        scores = self.scores[keep] if self.scores is not None else np.ones(len(boxes))
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(len(a), len(b))`` of x0 y0 x1 y1 boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_greedy(iou: np.ndarray, threshold: float) -> np.ndarray:
    """COCO matching: ``iou`` is (detections sorted by score, references); returns the
    0/1 true-positive flag of each detection."""
    n_det, n_ref = iou.shape
    tp = np.zeros(n_det, dtype=bool)
    taken = np.zeros(n_ref, dtype=bool)
    for d in range(n_det):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(n_ref):
            if not taken[g] and iou[d, g] >= best_iou:
                best, best_iou = g, iou[d, g]
        if best >= 0:
            taken[best], tp[d] = True, True
    return tp


def interpolated_ap(tp: np.ndarray, n_ref: int) -> float:
    """COCO 101-point AP from pooled TP flags already sorted by descending score."""
    if n_ref == 0:
        return math.nan
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_ref
    precision = ctp / np.arange(1, tp.size + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_LEVELS, side="left")
    found = idx < tp.size
    return float(np.where(found, envelope[np.minimum(idx, tp.size - 1)], 0.0).mean())


@dataclass(frozen=True)
class FROC:
    """Sensitivity at :data:`FROC_RATES` FP per image, their mean, and the curve itself."""

    rates: tuple[float, ...]
    sensitivity: tuple[float, ...]
    cpm: float
    curve: tuple[tuple[float, float], ...] = ()  # (FP per image, sensitivity), thinned

    def as_dict(self) -> dict[str, Any]:
        return {"fp_per_image": list(self.rates), "sensitivity": list(self.sensitivity),
                "cpm": self.cpm, "curve": [list(p) for p in self.curve]}  # fmt: skip


def froc(tp: np.ndarray, scores: np.ndarray, n_ref: int, n_images: int,
         rates: Sequence[float] = FROC_RATES) -> FROC:  # fmt: skip
    """FROC from pooled TP flags and scores (sorted by descending score)."""
    if n_ref == 0 or n_images == 0:
        nan = tuple(math.nan for _ in rates)
        return FROC(tuple(rates), nan, math.nan)
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    ends = np.flatnonzero(np.r_[np.diff(scores) != 0, True]) if tp.size else np.zeros(0, int)
    sens = np.r_[0.0, ctp[ends] / n_ref]
    fppi = np.r_[0.0, cfp[ends] / n_images]
    points = [float(sens[fppi <= rate + 1e-12].max()) for rate in rates]
    curve = list(zip(fppi.tolist(), sens.tolist(), strict=True))
    if len(curve) > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, len(curve) - 1, MAX_CURVE_POINTS).round().astype(int))
        curve = [curve[i] for i in keep]
    return FROC(tuple(rates), tuple(points), float(np.mean(points)), tuple(curve))


@dataclass(frozen=True)
class ClassResult:
    """Every figure of one class."""

    name: str
    images: int  # images holding at least one reference box of the class
    instances: int
    detections: int
    ap: dict[float, float]  # IoU threshold -> AP
    threshold: float | None
    tp: int
    fp: int
    fn: int
    froc: FROC

    @property
    def ap50(self) -> float:
        return self.ap[0.5]

    @property
    def ap50_95(self) -> float:
        values = list(self.ap.values())
        return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / self.instances if self.instances else math.nan

    def row(self) -> dict[str, Any]:
        """One row of the per-class table (keys as :mod:`training.report` reads them)."""
        return {"class": self.name, "images": self.images, "instances": self.instances,
                "precision": self.precision, "recall": self.recall, "map50": self.ap50,
                "map50_95": self.ap50_95, "threshold": self.threshold, "detections":
                self.detections, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "ap_per_iou": {f"{t:.2f}": v for t, v in self.ap.items()}}  # fmt: skip


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@dataclass
class DetectionReport:
    """Per-class results on a set of images."""

    classes: list[ClassResult]
    images: int
    notes: dict[str, int] = field(default_factory=dict)

    def by_name(self, name: str) -> ClassResult:
        for result in self.classes:
            if result.name == name:
                return result
        raise KeyError(name)

    def all_row(self) -> dict[str, Any]:
        scored = [c for c in self.classes if c.instances]
        return {"class": "all", "images": self.images,
                "instances": sum(c.instances for c in self.classes),
                "precision": _nanmean(c.precision for c in scored),
                "recall": _nanmean(c.recall for c in scored),
                "map50": _nanmean(c.ap50 for c in scored),
                "map50_95": _nanmean(c.ap50_95 for c in scored)}  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "classes": [self.all_row()] + [c.row() for c in self.classes],
            "froc": {c.name: c.froc.as_dict() for c in self.classes},
            "notes": dict(self.notes),
            "conventions": dict(CONVENTIONS),
        }


def _pooled(predictions: Sequence[ImageBoxes], truths: Sequence[ImageBoxes], k: int,
            iou: float) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """(TP flags, scores) of class ``k`` over all images, sorted by score; reference count."""
    flags, scores, n_ref = [], [], 0
    for pred, truth in zip(predictions, truths, strict=True):
        det, det_scores = pred.of_class(k)
        ref, _ = truth.of_class(k)
        n_ref += len(ref)
        flags.append(match_greedy(box_iou(det, ref), iou) if len(det) else np.zeros(0, bool))
        scores.append(det_scores)
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_flags = np.concatenate(flags) if flags else np.zeros(0, bool)
    order = np.argsort(-all_scores, kind="stable")
    return all_flags[order], all_scores[order], n_ref


def evaluate_boxes(
    predictions: Sequence[ImageBoxes],
    truths: Sequence[ImageBoxes],
    class_names: Sequence[str],
    thresholds: Mapping[str, float] | Sequence[float] | None = None,
    *,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> DetectionReport:
    """Per-class AP, operating point and FROC; ``predictions[i]`` and ``truths[i]`` are the
    same image. ``thresholds``: per class (name -> score, or by class index); None gives no
    operating point (all detections count)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} reference images")
    if 0.5 not in [round(t, 2) for t in iou_thresholds]:
        raise ValueError("iou_thresholds must include 0.5")
    results = []
    for k, name in enumerate(class_names):
        threshold = _threshold(thresholds, k, name)
        ap: dict[float, float] = {}
        for t in iou_thresholds:
            flags, scores, n_ref = _pooled(predictions, truths, k, t)
            ap[round(float(t), 2)] = interpolated_ap(flags, n_ref)
            if round(t, 2) == 0.5:
                flags50, scores50 = flags, scores
        kept = scores50 >= threshold if threshold is not None else np.ones(scores50.size, bool)
        tp = int(flags50[kept].sum())
        results.append(ClassResult(
            name=name, images=sum(int((t.labels == k).any()) for t in truths), instances=n_ref,
            detections=int(scores50.size), ap=ap, threshold=threshold, tp=tp,
            fp=int(kept.sum()) - tp, fn=n_ref - tp,
            froc=froc(flags50, scores50, n_ref, len(truths)),
        ))  # fmt: skip
    return DetectionReport(results, len(truths))


def _threshold(thresholds: Mapping[str, float] | Sequence[float] | None, k: int,
               name: str) -> float | None:  # fmt: skip
    if thresholds is None:
        return None
    if isinstance(thresholds, Mapping):
        value = thresholds.get(name)
        return None if value is None else float(value)
    return float(thresholds[k]) if k < len(thresholds) else None


# --------------------------------------------------------------------------------------------
# Choosing an operating threshold on validation detections


def best_f1_threshold(tp: np.ndarray, scores: np.ndarray, n_ref: int) -> tuple[float, float]:
    """(threshold, F1) maximising lesion-level F1 over cut-offs between distinct scores.

    ``tp``/``scores`` are pooled and sorted as :func:`evaluate_boxes` builds them. The
    cut-off sits halfway between the chosen score and the next lower one (at the score when
    it is the lowest), so the chosen detections keep their calls. No detections or no
    references: (0.5, NaN).
    """
    if n_ref == 0 or tp.size == 0:
        return 0.5, math.nan
    ctp = np.cumsum(tp)
    ends = np.flatnonzero(np.r_[np.diff(scores) != 0, True])
    f1 = 2 * ctp[ends] / (ends + 1 + n_ref)
    i = int(np.argmax(f1))
    return _between(scores, ends, i), float(f1[i])


def threshold_for_lesion_sensitivity(tp: np.ndarray, scores: np.ndarray, n_ref: int,
                                     target: float) -> float:  # fmt: skip
    """Highest cut-off whose lesion sensitivity reaches ``target`` (or the lowest score)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    if n_ref == 0 or tp.size == 0:
        return 0.5
    ctp = np.cumsum(tp)
    ends = np.flatnonzero(np.r_[np.diff(scores) != 0, True])
    reached = np.flatnonzero(ctp[ends] >= target * n_ref - 1e-9)
    return _between(scores, ends, int(reached[0]) if reached.size else len(ends) - 1)


def _between(scores: np.ndarray, ends: np.ndarray, i: int) -> float:
    """Halfway from score group ``i`` to the next lower score (the score itself if last)."""
    here = float(scores[ends[i]])
    if ends[i] + 1 >= scores.size:
        return here
    return (here + float(scores[ends[i] + 1])) / 2


def pooled_at_iou50(predictions: Sequence[ImageBoxes], truths: Sequence[ImageBoxes],
                    k: int) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Pooled TP flags (IoU 0.5), scores and reference count of class ``k``."""
    return _pooled(predictions, truths, k, 0.5)


# --------------------------------------------------------------------------------------------
# Reference boxes from a YOLO JSON map, and the ``training evaluate`` hook


def _suffix_index(paths: Sequence[str]) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        parts = PurePosixPath(path).parts
        for n in range(1, len(parts) + 1):
            tail = PurePosixPath(*parts[-n:])
            for key in {str(tail), str(tail.with_suffix(""))}:
                index.setdefault(key, []).append(i)
    return index


def yolo_truth(
    doc: Mapping[str, Sequence[str]],
    images: Sequence[tuple[str, int, int]],
    class_names: Sequence[str],
    source_classes: Sequence[str] | None = None,
) -> tuple[list[ImageBoxes | None], dict[str, int]]:
    """Reference boxes in source pixels for ``images`` = (path, rows, columns).

    A map key matches an image whose path ends with it (with or without the file suffix).
    ``source_classes`` names the map's class indexes (``classes.txt``; default:
    ``class_names``); boxes of classes not in ``class_names`` are ignored and counted.
    Images the map does not name get None (not evaluated).
    """
    source = list(source_classes) if source_classes is not None else list(class_names)
    wanted = {normalise_label(n): k for k, n in enumerate(class_names)}
    index = _suffix_index([PurePosixPath(p).as_posix() for p, _, _ in images])
    out: list[ImageBoxes | None] = [None] * len(images)
    notes = {"boxes_of_other_classes": 0, "keys_without_image": 0, "ambiguous_keys": 0}
    for key, lines in doc.items():
        norm = str(PurePosixPath(str(key).replace("\\", "/")))
        hits = index.get(norm) or index.get(str(PurePosixPath(norm).with_suffix(""))) or []
        if len(set(hits)) != 1:
            notes["ambiguous_keys" if hits else "keys_without_image"] += 1
            continue
        i = hits[0]
        _, rows, cols = images[i]
        boxes, labels = [], []
        for n, text in enumerate(lines):
            box = parse_yolo_line(text, f"{key}#{n}", source)
            name = box.label
            k = wanted.get(normalise_label(name)) if name is not None else None
            if k is None:
                notes["boxes_of_other_classes"] += 1
                continue
            boxes.append(box.to_pixels(rows, cols))
            labels.append(k)
        out[i] = ImageBoxes(np.asarray(boxes).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
    return out, {k: v for k, v in notes.items() if v}


def findings_to_boxes(findings: Iterable[Any], class_names: Sequence[str],
                      device_uid: str | None = None) -> ImageBoxes:  # fmt: skip
    """An :class:`~ai.types.ImageResult`'s boxed findings (of one model) as predictions."""
    index = {normalise_label(n): k for k, n in enumerate(class_names)}
    rows = []
    for f in findings:
        if f.box is None or (device_uid is not None and f.model.device_uid != device_uid):
            continue
        k = index.get(normalise_label(f.label))
        if k is not None:
            rows.append((f.box.x0, f.box.y0, f.box.x1, f.box.y1, k, float(f.probability)))
    if not rows:
        return ImageBoxes.empty()
    arr = np.asarray(rows, dtype=np.float64)
    return ImageBoxes(arr[:, :4], arr[:, 4].astype(np.int64), arr[:, 5])


def evaluate_detection(
    results: Sequence[tuple[Any, Any]],
    boxes: Mapping[str, Sequence[str]],
    labels: Sequence[Mapping[str, Any] | str],
    *,
    model: Any = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``training evaluate`` hook: figures of one detection model on labelled images.

    Args:
        results: (image with ``.path``, :class:`~ai.types.ImageResult`) pairs.
        boxes: the YOLO JSON map (relative path -> ``["C xc yc w h", ...]``).
        labels: the bundle's labels (metadata dicts with ``name`` and ``threshold``).
        model: the model's :class:`~ai.types.ModelIdentity` (its findings only; None: all
            boxed findings).
        classes: the map's class list (``classes.txt``); default: the bundle's labels.

    Returns:
        :meth:`DetectionReport.as_dict` (``classes`` rows incl. ``all``, ``froc``, notes).
    """
    names = [lab["name"] if isinstance(lab, Mapping) else str(lab) for lab in labels]
    thresholds = {lab["name"]: float(lab.get("threshold", 0.5)) for lab in labels
                  if isinstance(lab, Mapping)}  # fmt: skip
    images = [(str(PurePosixPath(getattr(img, "path", ""))), int(res.rows), int(res.columns))
              for img, res in results]  # fmt: skip
    truths, notes = yolo_truth(boxes, images, names, classes)
    uid = getattr(model, "device_uid", None)
    preds, refs = [], []
    for (_, result), truth in zip(results, truths, strict=True):
        if truth is None:
            notes["images_without_boxes"] = notes.get("images_without_boxes", 0) + 1
            continue
        preds.append(findings_to_boxes(result.findings, names, uid))
        refs.append(truth)
    if not refs:
        raise ValueError("no evaluated image has an entry in the box file")
    report = evaluate_boxes(preds, refs, names, thresholds or None)
    report.notes.update(notes)
    logger.info("detection evaluation: %d image(s), %s", report.images,
                {c.name: round(c.ap50, 3) for c in report.classes})  # fmt: skip
    return report.as_dict()
