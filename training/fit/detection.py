"""``training fit --task detection``: exported DICOM + boxes -> a RetinaNet detection bundle.

The detection task of the fit engine (:mod:`training.fit.engine`: run folder, epoch loop,
DDP/AMP, checkpoints and resume, ``run_config.json``, TensorBoard, bundle writing); this
module adds what boxes need. The run folder holds the same files as a classification run
(``predictions.csv`` becomes ``detections.csv``: every validation and test detection in
source pixels).

Labels: YOLO boxes (a folder of per-image ``.txt`` files or a JSON map ``file -> ["C xc yc w
h"]``, class names from ``--classes`` or a ``classes.txt`` beside the labels) or an NIH box
CSV (``Image Index, Finding Label, x, y, w, h``). ``--label-names`` picks the classes to
train (e.g. ``nodule``); boxes of other classes are counted and ignored. An image with an
empty list is a negative image and is trained on like any other: the ATSS matcher finds no
match there and the hard negative sampler trains on its highest-scoring background anchors
(:mod:`ai.detection_shims`). ``--unlabelled-as-negative`` makes images without any label
entry negatives too (NIH's CSV lists positives only).

Boxes go to model space through the same :class:`~ai.pixels.Letterbox` the node inverts.
Augmentation moves boxes with the pixels: a random scale (0.9-1.1) and shift (+-4 %) as one
affine map applied to image and box corners (exact for an axis-aligned scale and shift;
no rotation, which would loosen boxes, and no flips, as in classification), then gamma
contrast and noise, which leave boxes alone. ``--train-crop N`` trains on N-pixel crops
(half of them placed over a random box) and validates on whole images: cheaper steps for
large inputs, but on the 256 px phantoms whole images reached a higher AP in the same CPU
time (the crops' batch-norm statistics and context differ from whole images), so it is off
by default.

Model selection monitors the validation mAP50; the best epoch's detections on the
validation split choose each label's operating threshold (the score maximising lesion-level
F1, or the highest reaching ``--target-sensitivity``) and the held-out test split gives the
figures to trust (:mod:`ai.reference.metrics_detection`: AP50, AP50-95, P/R, FROC), written to
``metrics.json`` and the bundle's ``validation_metrics``.

(The issue's layout names this module after the task; its public names,
``DetectionFitConfig`` and ``fit_detection``, are those of the former
``training/fit_detection.py``.)
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ai.bundle.architectures import RetinaNetSpec
from ai.bundle.metadata import BundleMetadata, LabelSpec, NetworkSpec
from ai.codes import normalise_label
from ai.detection import (
    build_detector,
    configure_for_training,
    to_monai_boxes,
    unpack,
)
from ai.pixels import Letterbox
from ai.reference.dicom_files import index_dicom_tree
from ai.reference.labels import read_nih_boxes, read_yolo_labels
from ai.reference.matching import LabelMatch, MatchedImage, match_labels
from ai.reference.metrics_detection import (
    DetectionReport,
    ImageBoxes,
    best_f1_threshold,
    evaluate_boxes,
    pooled_at_iou50,
    threshold_for_lesion_sensitivity,
)
from ai.types import BundleError
from training.datasets import ImageCache, ImageItem
from training.errors import FitError
from training.fit import checkpoint
from training.fit.distributed import unwrap
from training.fit.engine import FitResult, Run, RunConfig, run_fit, run_split
from training.fit.optimisation import Optimisation, optimizer_step
from training.sampling import EpochSampler
from training.split import SPLITS, PatientSplit, apply_split

logger = logging.getLogger(__name__)

DETECTIONS = "detections.csv"
THRESHOLD_METHODS = ("f1", "sensitivity")
NO_ANCHOR_WARNING = "No anchor is matched with GT boxes"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class DetectionFitConfig(RunConfig):
    """Everything one detection run depends on (saved in ``run_config.json``)."""

    task: str = "detection"
    network: str = "retinanet"
    image_size: int = 512
    epochs: int = 30
    batch_size: int = 8
    clip_grad: float = 5.0
    patience: int = 10
    name: str = "cxr-detector"
    classes: Path | None = None
    unlabelled_as_negative: bool = False
    train_crop: int = 0  # 0: whole images
    threshold_method: str = "f1"
    target_sensitivity: float = 0.8
    progress_label: str = ""  # prefixes the progress bars, e.g. "[2/2] " in the demo build

    def __post_init__(self) -> None:
        try:
            spec = RetinaNetSpec.from_args(self.network_args)
        except BundleError as exc:
            raise FitError(str(exc)) from exc
        checks = [
            (self.task == "detection", f'task "{self.task}": this trainer fits detection'),
            (self.network == "retinanet", f'network "{self.network}" must be retinanet'),
            (self.image_size % spec.size_divisible == 0,
             f"image size {self.image_size} must be a multiple of {spec.size_divisible}"),
            (self.train_crop == 0 or (spec.size_divisible <= self.train_crop <= self.image_size
                                      and self.train_crop % spec.size_divisible == 0),
             f"train crop {self.train_crop} must be 0 or a multiple of {spec.size_divisible} "
             f"up to the image size"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch size must be at least 1"),
            (self.max_steps >= 0 and self.patience >= 0, "max steps and patience must be >= 0"),
            (self.lr > 0 and self.weight_decay >= 0, f"lr {self.lr} must be > 0, weight decay >= 0"),
            (self.threshold_method in THRESHOLD_METHODS,
             f'threshold method "{self.threshold_method}" must be one of {list(THRESHOLD_METHODS)}'),
            (0 < self.target_sensitivity <= 1, "target sensitivity must be in (0, 1]"),
            (self.num_workers >= 0 and self.threads >= 0, "workers and threads must be >= 0"),
            (len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and self.split[1] > 0,
             f"split {list(self.split)} must be train,val,test fractions summing to 1, val > 0"),
        ]  # fmt: skip
        self.check(checks)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class DetectionData:
    """Matched images, model-space boxes and the split: what every rank trains on."""

    label_names: tuple[str, ...]
    items: list[ImageItem]
    boxes: list[np.ndarray]  # per image (N, 5): x0 y0 x1 y1 (model px), class index
    letterboxes: list[Letterbox]
    splits: dict[str, list[int]]
    summary: dict[str, Any]
    report: str

    def subset(self, name: str) -> list[int]:
        return list(self.splits.get(name, []))

    def truth(self, name: str) -> list[ImageBoxes]:
        return [ImageBoxes(self.boxes[i][:, :4], self.boxes[i][:, 4].astype(np.int64))
                for i in self.subset(name)]  # fmt: skip


def _classes_file(config: DetectionFitConfig) -> Path:
    if config.classes is not None:
        return Path(config.classes)
    labels = Path(config.labels)
    folder = labels if labels.is_dir() else labels.parent
    if not (folder / "classes.txt").is_file():
        raise FitError(f'YOLO labels "{labels}": no --classes and no classes.txt in {folder}')
    return folder / "classes.txt"


def read_boxes(config: DetectionFitConfig) -> tuple[dict[str, list[Any]], tuple[str, ...], int]:
    """(box map restricted to the trained classes, class names, boxes of other classes)."""
    labels = Path(config.labels)
    if labels.suffix.lower() == ".csv":
        raw: dict[str, list[Any]] = dict(read_nih_boxes(labels))
        found = sorted({b.label for boxes in raw.values() for b in boxes})
    else:
        raw = dict(read_yolo_labels(labels, _classes_file(config)))
        found = [n.strip() for n in _classes_file(config).read_text(encoding="utf-8").splitlines()
                 if n.strip()]  # fmt: skip
    names = tuple(config.label_names) or tuple(found)
    wanted = {normalise_label(n) for n in names}
    known = {normalise_label(n) for n in found}
    missing = sorted(n for n in names if normalise_label(n) not in known)
    if missing:
        raise FitError(f"--label-names {missing} are not classes of {labels.name} ({found})")
    kept: dict[str, list[Any]] = {}
    other = 0
    for key, boxes in raw.items():
        keep = [b for b in boxes if b.label is None or normalise_label(b.label) in wanted]
        other += len(boxes) - len(keep)
        kept[key] = keep
    return kept, names, other


def _match(config: DetectionFitConfig, progress: bool) -> tuple[LabelMatch, int, int]:
    with tqdm(desc=f"{config.progress_label}index DICOM", unit="file", disable=not progress) as bar:
        index = index_dicom_tree(config.data, progress=bar.update)
    boxes, names, other = read_boxes(config)
    match = match_labels(index, boxes, classes=names, strict=config.strict)
    negatives = 0
    if config.unlabelled_as_negative:
        for image in match.images_without_labels:
            match.matched.append(MatchedImage(image, "", (0,) * len(names)))
        negatives, match.images_without_labels = len(match.images_without_labels), []
    if config.modalities:
        allowed = {m.upper() for m in config.modalities}
        match.matched = [m for m in match.matched if m.image.modality in allowed]
    match.check(strict=False)
    return match, other, negatives


def prepare_data(config: DetectionFitConfig, *, resume: bool,
                 progress: bool) -> tuple[DetectionData, PatientSplit]:  # fmt: skip
    """Index, match, convert boxes to model space, split (rank 0; the result is broadcast)."""
    match, other, negatives = _match(config, progress)
    items, boxes, letterboxes = [], [], []
    for m in match.matched:
        box = Letterbox(m.image.rows, m.image.cols, config.image_size)
        rows = [(*box.to_model(x0, y0), *box.to_model(x1, y1), k) for k, x0, y0, x1, y1 in m.boxes]
        items.append(
            ImageItem(m.image.path, m.image.sop_instance_uid, tuple(float(t) for t in m.targets))
        )
        boxes.append(np.asarray(rows, dtype=np.float32).reshape(-1, 5))
        letterboxes.append(box)
    sops = [item.sop_instance_uid for item in items]
    split = run_split(config, resume=resume, sops=sops, matched=match.matched,
                      label_names=match.label_names)  # fmt: skip
    data = DetectionData(tuple(match.label_names), items, boxes, letterboxes,
                         apply_split(split, sops), {}, match.report())  # fmt: skip
    data.summary = {
        "images": len(items), "patients": len({m.patient_key for m in match.matched}),
        "labels": list(data.label_names), "match": match.summary(),
        "boxes_of_other_classes_ignored": other, "unlabelled_as_negative": negatives,
        "splits": {s: _split_summary(data, s) for s in SPLITS},
    }  # fmt: skip
    _check_box_sizes(config, data)
    return data, split


def _split_summary(data: DetectionData, name: str) -> dict[str, Any]:
    idx = data.subset(name)
    counts = [0] * len(data.label_names)
    for i in idx:
        for k in data.boxes[i][:, 4].astype(int):
            counts[k] += 1
    return {"images": len(idx), "negative_images": sum(1 for i in idx if len(data.boxes[i]) == 0),
            "boxes": dict(zip(data.label_names, counts, strict=True))}  # fmt: skip


def _check_box_sizes(config: DetectionFitConfig, data: DetectionData) -> None:
    """Warn when boxes are far outside the anchor sizes (the matcher would miss them)."""
    spec = RetinaNetSpec.from_args(config.network_args)
    lo, hi = min(spec.anchor_sizes) / 2, max(spec.anchor_sizes) * 2**spec.levels
    sides = np.concatenate([np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for b in data.boxes])
    outside = int(((sides < lo) | (sides > hi)).sum()) if sides.size else 0
    if outside:
        logger.warning("%d of %d boxes are outside the anchor range %.0f-%.0f model px; "
                       "adjust network args anchor_sizes", outside, sides.size, lo, hi)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dataset and augmentation


def _keep_visible(
    boxes: np.ndarray, before: np.ndarray, size: int, min_visible: float = 0.5
) -> np.ndarray:
    """Clip boxes to the ``size`` square; drop those that kept < ``min_visible`` of their area."""
    clipped = boxes.copy()
    clipped[:, :4] = np.clip(clipped[:, :4], 0, size)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    keep = area(clipped) >= min_visible * np.maximum(area(before), 1e-6)
    return clipped[keep & (area(clipped) > 0)]


def affine_jitter(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                  scale: float = 0.1, shift: float = 0.04) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Random scale about the centre and shift, applied to a (S, S) image and its boxes.

    In pixel-edge coordinates ``x' = s (x - S/2) + S/2 + dx``; OpenCV's matrix is the same
    map in pixel-centre coordinates (shifted by half a pixel), so boxes stay exact.
    """
    size = image.shape[-1]
    s = float(rng.uniform(1 - scale, 1 + scale))
    dx, dy = (float(v) for v in rng.uniform(-shift, shift, 2) * size)
    c = size / 2
    matrix = np.asarray([[s, 0, s * (0.5 - c) + c + dx - 0.5],
                         [0, s, s * (0.5 - c) + c + dy - 0.5]], dtype=np.float64)  # fmt: skip
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)  # fmt: skip
    moved = boxes.copy()
    moved[:, [0, 2]] = s * (boxes[:, [0, 2]] - c) + c + dx
    moved[:, [1, 3]] = s * (boxes[:, [1, 3]] - c) + c + dy
    return out, _keep_visible(moved, moved, size)


def random_crop(image: np.ndarray, boxes: np.ndarray, crop: int, rng: np.random.Generator,
                positive_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A ``crop`` square of a (S, S) image; with ``positive_fraction`` it holds a random box."""
    size = image.shape[-1]
    hi = size - crop
    x, y = (int(v) for v in rng.integers(0, hi + 1, 2))
    if len(boxes) and rng.random() < positive_fraction:
        b = boxes[int(rng.integers(len(boxes)))]
        x = int(rng.integers(*_span(b[0], b[2], crop, hi)))
        y = int(rng.integers(*_span(b[1], b[3], crop, hi)))
    shifted = boxes.copy()
    shifted[:, [0, 2]] -= x
    shifted[:, [1, 3]] -= y
    return image[y : y + crop, x : x + crop], _keep_visible(shifted, shifted, crop)


def _span(lo: float, hi_edge: float, crop: int, limit: int) -> tuple[int, int]:
    """Crop origins ``[a, b)`` keeping ``[lo, hi_edge]`` inside the crop (centred if too big)."""
    a = max(0, math.ceil(hi_edge - crop))
    b = min(limit, math.floor(lo))
    if a > b:
        a = b = min(max(0, round((lo + hi_edge - crop) / 2)), limit)
    return a, b + 1


def intensity_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma contrast (p 0.5, 0.7-1.4) and a little Gaussian noise (p 0.3): boxes unchanged."""
    out = image
    if rng.random() < 0.5:
        out = np.power(np.clip(out, 0, 1), rng.uniform(0.7, 1.4)).astype(np.float32)
    if rng.random() < 0.3:
        out = out + rng.normal(0.0, 0.01, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


class DetectionDataset(Dataset):
    """Images with their boxes; items: ``image`` (1, S, S), ``boxes`` (MONAI axis order),
    ``labels``, ``index``. Keys ``i`` or ``(i, epoch)``; the epoch seeds augmentation."""

    def __init__(self, indexes: Sequence[int], data: DetectionData, cache: ImageCache, *,
                 augment: bool = False, crop: int = 0, seed: int = 0) -> None:  # fmt: skip
        self.indexes, self.data, self.cache = list(indexes), data, cache
        self.augment, self.crop, self.seed = augment, crop, int(seed)

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int | np.integer) else key
        i = self.indexes[int(index)]
        image = self.cache.get(self.data.items[i])[0]
        boxes = self.data.boxes[i]
        if self.augment or self.crop:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), int(index)]))
            if self.augment:
                image, boxes = affine_jitter(image, boxes, rng)
            if self.crop:
                image, boxes = random_crop(image, boxes, self.crop, rng)
            if self.augment:
                image = intensity_jitter(image, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "boxes": to_monai_boxes(boxes[:, :4]),
            "labels": torch.as_tensor(boxes[:, 4], dtype=torch.int64),
            "index": int(index),
        }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep per-image box targets as a list (counts differ)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "targets": [{"boxes": b["boxes"], "labels": b["labels"]} for b in batch],
        "index": torch.as_tensor([b["index"] for b in batch]),
    }


# --------------------------------------------------------------------------------------------
# The run


def fit_detection(
    config: DetectionFitConfig,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train (or continue) a detection run; see the module docstring."""
    return run_fit(DetectionRun, config, resume=resume, on_epoch_end=on_epoch_end)


@dataclass
class DetectionRun(Run):
    """The detection hooks of the engine's run (``model``: the RetinaNetDetector)."""

    command = "training fit --task detection"
    metrics_method = ("detections matched at IoU >= 0.5 (mAP50-95: 0.50:0.05:0.95), COCO "
                      "101-point AP; thresholds on the validation split; test: held-out patients")  # fmt: skip
    # A batch without any box gives a box loss that does not depend on the regression head,
    # which plain DDP refuses.
    find_unused_parameters = True
    checkpoint_tags = {"task": "detection"}  # noqa: RUF012 (read only)

    @classmethod
    def check_labels(cls, config: Any) -> None:
        if not Path(config.labels).exists():
            raise FitError(f'--labels "{config.labels}" does not exist')

    @classmethod
    def prepare(cls, config: Any, *, resume: bool, progress: bool) -> tuple[Any, PatientSplit]:
        return prepare_data(config, resume=resume, progress=progress)

    @classmethod
    def build_model(cls, config: Any, data: Any, resume: bool) -> tuple[nn.Module, dict | None]:
        torch.manual_seed(config.seed)
        try:
            detector = build_detector(config.network_args, num_classes=len(data.label_names))
            configure_for_training(detector, config.network_args)
        except BundleError as exc:
            raise FitError(str(exc)) from exc
        report = None
        if config.pretrained and not resume:
            report = checkpoint.load_pretrained(detector, config.pretrained)
        return detector, report

    @classmethod
    def choose_monitor(cls, data: Any) -> str:
        has_val_boxes = any(len(data.boxes[i]) for i in data.subset("val"))
        return "val_map50" if has_val_boxes else "last_epoch"

    def collate_fn(self) -> Callable[[Any], Any] | None:
        return collate

    def eval_dataset(self, split: str) -> DetectionDataset:
        return DetectionDataset(self.data.subset(split), self.data, self.cache)

    def train_parts(self) -> tuple[DetectionDataset, EpochSampler]:
        config, info = self.config, self.info
        train_ds = DetectionDataset(self.data.subset("train"), self.data, self.cache,
                                    augment=config.augment, crop=config.train_crop,
                                    seed=config.seed)  # fmt: skip
        sampler = EpochSampler(len(train_ds), num_replicas=info.world_size, rank=info.rank,
                               seed=config.seed)  # fmt: skip
        return train_ds, sampler

    def train_epoch(
        self, opt: Optimisation, loader: Any, budget: int, bar: Any
    ) -> dict[str, float]:
        losses = _train_steps(self, opt, loader, budget, bar)
        return {"train_loss": losses["loss"], "train_cls_loss": losses["classification"],
                "train_box_loss": losses["box_regression"]}  # fmt: skip

    def validate(self, opt: Optimisation) -> tuple[float, dict[str, Any]]:
        report = evaluate_boxes(self.predict("val"), self.data.truth("val"), self.data.label_names)
        map50 = report.all_row()["map50"]
        return map50, {"val_map50": map50, "val_ap50": {c.name: c.ap50 for c in report.classes}}

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        map50 = record["val_map50"]
        logger.info("epoch %d step %d: train loss %.4f (cls %.4f, box %.4f), val mAP50 %.4f%s",
                    record["epoch"], record["step"], record["train_loss"],
                    record["train_cls_loss"], record["train_box_loss"], map50,
                    " (best)" if record["improved"] else "")  # fmt: skip
        writer, step = self.writer, record["step"]
        if writer is not None:
            writer.add_scalar("train/epoch_loss", record["train_loss"], step)
            if math.isfinite(map50):
                writer.add_scalar("val/map50", map50, step)
            for name, value in record["val_ap50"].items():
                if math.isfinite(value):
                    writer.add_scalar(f"val_ap50/{name}", value, step)
            writer.flush()

    def predict(self, split: str) -> list[ImageBoxes]:
        return predict_split(self, split)

    def score(self, predictions: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
        data, names = self.data, self.data.label_names
        thresholds, methods = choose_thresholds(self.config, names, predictions["val"],
                                                data.truth("val"))  # fmt: skip
        reports = {s: evaluate_boxes(p, data.truth(s), names, thresholds)
                   for s, p in predictions.items()}  # fmt: skip
        per_label = {
            name: {"threshold": thresholds[k], "threshold_method": methods[k],
                   **{s: _class_entry(r, name) for s, r in reports.items()}}
            for k, name in enumerate(names)
        }  # fmt: skip
        return thresholds, {"per_label": per_label,
                            "summary": {s: r.all_row() for s, r in reports.items()}}  # fmt: skip

    def write_predictions(self, predictions: dict[str, Any]) -> None:
        """``detections.csv``: every validation/test detection, boxes in source pixels."""
        data, names = self.data, self.data.label_names
        with (self.config.run_dir / DETECTIONS).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["sop_instance_uid", "split", "label", "score", "x0", "y0", "x1", "y1"])
            for split, found in predictions.items():
                for i, det in zip(data.subset(split), found, strict=True):
                    for box, k, score in zip(det.boxes, det.labels, det.scores, strict=True):
                        src = data.letterboxes[i].box_to_source([float(v) for v in box])
                        if src is not None:
                            writer.writerow([data.items[i].sop_instance_uid, split, names[k],
                                             f"{score:.6f}", *(f"{v:.2f}" for v in
                                                               (src.x0, src.y0, src.x1, src.y1))])  # fmt: skip

    def training_record(self) -> dict[str, Any]:
        config = self.config
        return {
            "optimizer": "AdamW", "learning_rate": config.lr, "schedule": "linear warm-up + cosine",
            "batch_size": config.batch_size, "train_crop": config.train_crop,
            "augment": config.augment, "matcher": "ATSS", "sampler": "hard negatives",
        }  # fmt: skip

    def metadata(self, labels: tuple[LabelSpec, ...], training: dict[str, Any],
                 metrics: dict[str, Any]) -> BundleMetadata:  # fmt: skip
        config = self.config
        validation = {k: metrics[k] for k in ("method", "per_label", "summary")}
        validation["ap50"] = {n: e.get("val", {}).get("map50")
                              for n, e in metrics["per_label"].items()}  # fmt: skip
        args = RetinaNetSpec.from_args(config.network_args).to_json()
        return BundleMetadata(
            name=config.name, version=config.version, labels=labels, task="detection",
            network=NetworkSpec("retinanet", args), input=config.input_spec,
            description=config.description or f"RetinaNet ({args['backbone']}) trained by training fit",
            training=training, validation_metrics=validation,
        )  # fmt: skip


def _train_steps(
    run: DetectionRun, opt: Optimisation, loader: DataLoader, budget: int, bar: Any
) -> dict[str, float]:
    """Up to ``budget`` optimiser steps; returns mean losses."""
    model, device, state = run.model, run.device, run.state
    model.train()
    sums = {"loss": 0.0, "classification": 0.0, "box_regression": 0.0}
    steps = 0
    for batch in loader:
        if steps >= budget:
            break
        images = batch["image"].to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        with warnings.catch_warnings():
            # MONAI warns per box no anchor matches; _check_box_sizes already said so once
            warnings.filterwarnings("ignore", message=NO_ANCHOR_WARNING)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=opt.amp):
                losses = model(images, targets)
        cls_loss, box_loss = losses["classification"].float(), losses["box_regression"].float()
        loss = cls_loss + box_loss
        optimizer_step(opt, model, loss)
        steps += 1
        state.step += 1
        values = {"loss": float(loss.detach()), "classification": float(cls_loss.detach()),
                  "box_regression": float(box_loss.detach())}  # fmt: skip
        for key, value in values.items():
            sums[key] += value
        if run.writer is not None and state.step % max(run.config.log_every, 1) == 0:
            for key, value in values.items():
                run.writer.add_scalar(f"train/{key}", value, state.step)
            run.writer.add_scalar("train/lr", opt.optimizer.param_groups[0]["lr"], state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def predict_split(run: DetectionRun, split: str) -> list[ImageBoxes]:
    """Detections (model pixels) of every image of ``split``, in split order, all ranks."""
    detector = unwrap(run.model)
    detector.eval()
    found: dict[int, ImageBoxes] = {}
    for batch in run.eval_loader(split):
        images = batch["image"].to(run.device, non_blocking=True)
        with torch.autocast(device_type=run.device.type, dtype=torch.float16,
                            enabled=run.config.amp and run.device.type == "cuda"):  # fmt: skip
            outputs = detector(images)
        for index, det in zip(batch["index"].tolist(), unpack(outputs, detector), strict=True):
            found[int(index)] = ImageBoxes(det.boxes, det.labels, det.scores)
    if run.info.distributed:
        parts: list[Any] = [None] * run.info.world_size
        dist.all_gather_object(parts, found)
        found = {k: v for part in parts for k, v in part.items()}
    n = len(run.data.subset(split))
    if sorted(found) != list(range(n)):
        raise RuntimeError(f"evaluation of {split} did not cover every image")
    return [found[i] for i in range(n)]


# --------------------------------------------------------------------------------------------
# Thresholds and metrics


def choose_thresholds(config: DetectionFitConfig, names: Sequence[str], preds: Sequence[ImageBoxes],
                      truths: Sequence[ImageBoxes]) -> tuple[list[float], list[str]]:  # fmt: skip
    """Per-label operating threshold on the validation detections (F1 or sensitivity)."""
    thresholds, methods = [], []
    for k, _ in enumerate(names):
        flags, scores, n_ref = pooled_at_iou50(preds, truths, k)
        if n_ref == 0 or scores.size == 0:
            thresholds.append(0.5)
            methods.append("default 0.5 (no validation boxes or detections)")
        elif config.threshold_method == "sensitivity":
            thresholds.append(threshold_for_lesion_sensitivity(flags, scores, n_ref,
                                                               config.target_sensitivity))  # fmt: skip
            methods.append(f"lesion sensitivity >= {config.target_sensitivity:g} on validation")
        else:
            thresholds.append(best_f1_threshold(flags, scores, n_ref)[0])
            methods.append("maximum lesion-level F1 (IoU >= 0.5) on validation")
    return [min(max(t, 0.0), 1.0) for t in thresholds], methods


def _class_entry(report: DetectionReport, name: str) -> dict[str, Any]:
    result = report.by_name(name)
    return {**result.row(), "froc": result.froc.as_dict()}
