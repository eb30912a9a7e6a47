"""``training fit --task detection``: exported DICOM + boxes -> a RetinaNet detection bundle.

The classification fit (:mod:`training.fit`) sets the pattern; this module reuses its parts
(the node's preprocessing and array cache, the patient-level split, the DDP/AMP engine of
:mod:`training.loop`, checkpoints, ``run_config.json``, TensorBoard) and adds what boxes need.
The run folder holds the same files as a classification run (``predictions.csv`` becomes
``detections.csv``: every validation and test detection in source pixels).

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
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ai.bundle.architectures import RetinaNetSpec
from ai.bundle.load import save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import normalise_label
from ai.detection import build_detector, configure_for_training, to_monai_boxes, unpack
from ai.pixels import Letterbox, PreprocessParams
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
from ai.types import BundleError, PixelDataError
from training import checkpoint
from training.checkpoint import clean_json, git_commit, versions, write_json
from training.datasets import ImageCache, ImageItem
from training.fit import (  # the classification fit's run-folder conventions, shared
    BUNDLE_DIR,
    DATA_REPORT,
    METRICS,
    RESUME_OVERRIDES,
    RUN_CONFIG,
    FitResult,
    RunState,
    _code,
    _jsonish,
    _load_record,
    _now,
)
from training.loop import (
    DistInfo,
    barrier,
    broadcast_object,
    init_distributed,
    make_optimisation,
    optimizer_step,
    resolve_device,
    shutdown,
    unwrap,
)
from training.sampling import EpochSampler, ShardSampler
from training.split import DEFAULT_FRACTIONS, SPLITS, PatientSplit, apply_split, patient_split

logger = logging.getLogger(__name__)

DETECTIONS = "detections.csv"
THRESHOLD_METHODS = ("f1", "sensitivity")
NO_ANCHOR_WARNING = "No anchor is matched with GT boxes"


class DetectionFitError(ValueError):
    """A problem with the run's inputs or state that the user can fix."""


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DetectionFitConfig:
    """Everything one detection run depends on (saved in ``run_config.json``)."""

    data: Path
    labels: Path
    out: Path
    task: str = "detection"
    classes: Path | None = None
    label_names: tuple[str, ...] = ()
    strict: bool = False
    unlabelled_as_negative: bool = False
    modalities: tuple[str, ...] = ("CR", "DX")
    network: str = "retinanet"
    network_args: dict[str, Any] = field(default_factory=dict)
    pretrained: Path | None = None
    image_size: int = 512
    clahe: bool = False
    train_crop: int = 0  # 0: whole images
    epochs: int = 30
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = -1
    min_lr_ratio: float = 0.01
    clip_grad: float = 5.0
    augment: bool = True
    patience: int = 10
    min_delta: float = 0.0
    threshold_method: str = "f1"
    target_sensitivity: float = 0.8
    split: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_file: Path | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    threads: int = 0
    cache_dir: Path | None = None
    disk_cache: bool = True
    cache_memory_mb: int = 4096
    name: str = "cxr-detector"
    version: str = "0.1.0"
    description: str = ""
    progress: bool = True
    progress_label: str = ""  # prefixes the progress bars, e.g. "[2/2] " in the demo build
    log_every: int = 10

    def __post_init__(self) -> None:
        try:
            spec = RetinaNetSpec.from_args(self.network_args)
        except BundleError as exc:
            raise DetectionFitError(str(exc)) from exc
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
        for ok, message in checks:
            if not ok:
                raise DetectionFitError(message)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=self.image_size, channels=1, clahe=self.clahe)

    @property
    def preprocess(self) -> PreprocessParams:
        return self.input_spec.preprocess_params()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, Path):
                doc[key] = str(value.absolute())
            elif isinstance(value, tuple):
                doc[key] = list(value)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DetectionFitConfig:
        kinds = {f.name: str(f.type) for f in fields(cls)}
        values = {}
        for key, value in doc.items():
            if key in kinds:
                if "Path" in kinds[key] and value is not None:
                    value = Path(value)
                elif "tuple" in kinds[key] and value is not None:
                    value = tuple(value)
                values[key] = value
        return cls(**values)


def saved_task(run_dir: Path) -> str:
    """The task of the run in ``run_dir`` (``classification`` when unknown)."""
    try:
        doc = json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))
        return str(doc["args"].get("task", "classification"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "classification"


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> DetectionFitConfig:
    """The saved configuration of ``run_dir`` with the allowed ``overrides`` applied."""
    try:
        saved = json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DetectionFitError(f'--resume "{run_dir}": no readable {RUN_CONFIG} ({exc})') from exc
    config = DetectionFitConfig.from_json({**saved, "out": str(run_dir)})
    current = config.to_json()
    changed = {k: v for k, v in overrides.items()
               if k != "out" and current.get(k) != _jsonish(v)}  # fmt: skip
    refused = sorted(set(changed) - RESUME_OVERRIDES)
    if refused:
        raise DetectionFitError(f"--resume continues the saved run; these settings cannot "
                                f"change: {refused} (allowed: {sorted(RESUME_OVERRIDES)})")  # fmt: skip
    return replace(config, **changed)



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
        raise DetectionFitError(f'YOLO labels "{labels}": no --classes and no classes.txt in {folder}')
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
        raise DetectionFitError(f"--label-names {missing} are not classes of {labels.name} ({found})")
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
        items.append(ImageItem(m.image.path, m.image.sop_instance_uid, tuple(float(t) for t in m.targets)))
        boxes.append(np.asarray(rows, dtype=np.float32).reshape(-1, 5))
        letterboxes.append(box)
    sops = [item.sop_instance_uid for item in items]
    source = config.run_dir if resume else config.split_file
    if source is not None:
        split = PatientSplit.load(Path(source))
    else:
        split = patient_split(sops, [m.patient_key for m in match.matched],
                              [m.targets for m in match.matched], fractions=config.split,
                              seed=config.seed, label_names=match.label_names)  # fmt: skip
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
    lo, hi = min(spec.anchor_sizes) / 2, max(spec.anchor_sizes) * 2 ** spec.levels
    sides = np.concatenate([np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for b in data.boxes])
    outside = int(((sides < lo) | (sides > hi)).sum()) if sides.size else 0
    if outside:
        logger.warning("%d of %d boxes are outside the anchor range %.0f-%.0f model px; "
                       "adjust network args anchor_sizes", outside, sides.size, lo, hi)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dataset and augmentation


def _keep_visible(boxes: np.ndarray, before: np.ndarray, size: int, min_visible: float = 0.5) -> np.ndarray:
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


def _loader(dataset: Dataset, sampler: Any, config: DetectionFitConfig, *, drop_last: bool,
            cuda: bool) -> DataLoader:  # fmt: skip
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                      num_workers=config.num_workers, drop_last=drop_last, pin_memory=cuda,
                      persistent_workers=config.num_workers > 0, collate_fn=collate,
                      generator=torch.Generator().manual_seed(config.seed))  # fmt: skip


# --------------------------------------------------------------------------------------------
# The run


# One run record for both trainers: the counters every checkpoint holds and the result.
DetectionFitResult = FitResult


@dataclass
class _Run:
    config: DetectionFitConfig
    info: DistInfo
    device: torch.device
    data: DetectionData
    model: nn.Module  # the RetinaNetDetector, DDP-wrapped under torchrun
    cache: ImageCache
    monitor: str
    state: RunState = field(default_factory=RunState)
    resume: bool = False
    writer: Any = None

    @property
    def main(self) -> bool:
        return self.info.is_main

    def eval_loader(self, split: str) -> DataLoader:
        ds = DetectionDataset(self.data.subset(split), self.data, self.cache)
        sampler = ShardSampler(len(ds), self.info.world_size, self.info.rank)
        return _loader(ds, sampler, self.config, drop_last=False, cuda=self.device.type == "cuda")


def fit_detection(
    config: DetectionFitConfig,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> DetectionFitResult:
    """Train (or continue) a detection run; see the module docstring."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    info = init_distributed("cuda" if cuda else "cpu")
    try:
        try:
            device = resolve_device(config.device, info)
        except (ValueError, RuntimeError) as exc:
            raise DetectionFitError(f'--device "{config.device}": {exc}') from exc
        _check_run_dir(config, resume)
        prepared = _prepare_on_main(config, resume) if info.is_main else None
        data: DetectionData = broadcast_object(prepared, info)
        run = _setup(config, info, device, data, resume)
        _train(run, on_epoch_end)
        result = _finish(run, started)
        barrier(info)
        return result
    finally:
        shutdown(info)
        torch.set_num_threads(threads)


def _check_run_dir(config: DetectionFitConfig, resume: bool) -> None:
    out = config.run_dir
    if resume:
        if not (out / checkpoint.LAST).is_file():
            raise DetectionFitError(f'--resume "{out}": no {checkpoint.LAST} to continue from')
        return
    if (out / checkpoint.LAST).exists():
        raise DetectionFitError(f'--out "{out}" already holds a run; continue it with '
                                f"--resume {out} or choose a new folder")  # fmt: skip
    if not Path(config.data).is_dir():
        raise DetectionFitError(f'--data "{config.data}" is not a folder')
    if not Path(config.labels).exists():
        raise DetectionFitError(f'--labels "{config.labels}" does not exist')


def _prepare_on_main(config: DetectionFitConfig, resume: bool) -> DetectionData:
    out = config.run_dir
    out.mkdir(parents=True, exist_ok=True)
    data, split = prepare_data(config, resume=resume, progress=config.progress)
    (out / DATA_REPORT).write_text(data.report + "\n", encoding="utf-8")
    if not resume:
        split.save(out)
    if not data.splits.get("train") or not data.splits.get("val"):
        raise DetectionFitError(f"the split leaves no training or no validation images: "
                                f"{data.summary['splits']}")  # fmt: skip
    record = _load_record(out) if resume else {}
    record.update({"command": "training fit --task detection", "args": config.to_json(),
                   "versions": versions(), "git_commit": git_commit(), "data": data.summary})  # fmt: skip
    if resume:
        record.setdefault("resumes", []).append({"at": _now()})
    else:
        record["started"] = _now()
    write_json(out / RUN_CONFIG, clean_json(record))
    return data




def _setup(config: DetectionFitConfig, info: DistInfo, device: torch.device,
           data: DetectionData, resume: bool) -> _Run:  # fmt: skip
    torch.manual_seed(config.seed)
    try:
        detector = build_detector(config.network_args, num_classes=len(data.label_names))
        configure_for_training(detector, config.network_args)
    except BundleError as exc:
        raise DetectionFitError(str(exc)) from exc
    if config.pretrained and not resume:
        report = checkpoint.load_pretrained(detector, config.pretrained)
        if info.is_main:
            record = _load_record(config.run_dir)
            record["pretrained"] = report
            write_json(config.run_dir / RUN_CONFIG, clean_json(record))
    detector.to(device)
    cache_dir = config.cache_dir or (config.run_dir / "cache")
    cache = ImageCache(config.preprocess, cache_dir if config.disk_cache else None,
                       memory_bytes=config.cache_memory_mb << 20)  # fmt: skip
    has_val_boxes = any(len(data.boxes[i]) for i in data.subset("val"))
    monitor = "val_map50" if has_val_boxes else "last_epoch"
    run = _Run(config, info, device, data, _wrap(detector, device, info), cache, monitor,
               resume=resume)  # fmt: skip
    mine = data.items[info.rank :: info.world_size]
    for item in tqdm(mine, desc=f"{config.progress_label}preprocess", unit="img", disable=not (config.progress and run.main)):
        try:
            cache.get(item)
        except PixelDataError as exc:
            raise DetectionFitError(f"cannot preprocess an image: {exc}") from exc
    barrier(info)
    return run


def _wrap(detector: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """DDP under torchrun. ``find_unused_parameters``: a batch without any box gives a box
    loss that does not depend on the regression head, which plain DDP refuses."""
    if not info.distributed:
        return detector
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(detector, device_ids=ids, find_unused_parameters=True)


def _train(run: _Run, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
    config, info = run.config, run.info
    train_ds = DetectionDataset(run.data.subset("train"), run.data, run.cache,
                                augment=config.augment, crop=config.train_crop, seed=config.seed)  # fmt: skip
    sampler = EpochSampler(len(train_ds), num_replicas=info.world_size, rank=info.rank,
                           seed=config.seed)  # fmt: skip
    drop_last = len(sampler) > config.batch_size
    per_epoch = max(1, len(sampler) // config.batch_size if drop_last
                    else math.ceil(len(sampler) / config.batch_size))  # fmt: skip
    total = per_epoch * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    warmup = config.warmup_steps if config.warmup_steps >= 0 else round(0.05 * total)
    opt = make_optimisation(run.model, run.device, lr=config.lr, weight_decay=config.weight_decay,
                            total_steps=total, warmup_steps=warmup,
                            min_lr_ratio=config.min_lr_ratio, amp=config.amp,
                            clip_grad=config.clip_grad)  # fmt: skip
    if run.resume:
        _restore(run, opt)
    loader = _loader(train_ds, sampler, config, drop_last=drop_last, cuda=run.device.type == "cuda")
    if run.main:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where used

        run.writer = SummaryWriter(str(config.run_dir / "tensorboard"),
                                   purge_step=run.state.step or None)  # fmt: skip
    logger.info("Detection training: %d images, %d steps per epoch, %d steps in all",
                len(train_ds), per_epoch, total)  # fmt: skip
    state = run.state
    try:
        while state.epoch < config.epochs and state.step < total and not state.stopped_early:
            _epoch(run, opt, sampler, loader, min(per_epoch, total - state.step))
            if on_epoch_end is not None:
                on_epoch_end(dict(state.history[-1]))
    finally:
        if run.writer is not None:
            run.writer.close()


def _train_steps(run: _Run, opt: Any, loader: DataLoader, budget: int, bar: Any) -> dict[str, float]:
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
def predict_split(run: _Run, split: str) -> list[ImageBoxes]:
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


def _epoch(run: _Run, opt: Any, sampler: EpochSampler, loader: DataLoader, budget: int) -> None:
    config, state = run.config, run.state
    sampler.set_epoch(state.epoch)
    t0 = time.perf_counter()
    bar = tqdm(total=budget, desc=f"{config.progress_label}epoch {state.epoch + 1}/{config.epochs}", unit="step",
               disable=not (config.progress and run.main), leave=False)  # fmt: skip
    with bar:
        losses = _train_steps(run, opt, loader, budget, bar)
    report = evaluate_boxes(predict_split(run, "val"), run.data.truth("val"), run.data.label_names)
    ap50 = {c.name: c.ap50 for c in report.classes}
    map50 = report.all_row()["map50"]
    state.epoch += 1
    if run.monitor == "last_epoch":
        improved = True
    elif not math.isfinite(map50):
        improved = state.best_metric is None
    else:
        improved = state.best_metric is None or map50 > state.best_metric + config.min_delta
    if improved:
        state.best_metric = None if not math.isfinite(map50) else float(map50)
        state.best_epoch, state.bad_epochs = state.epoch, 0
    else:
        state.bad_epochs += 1
    state.stopped_early = bool(config.patience and state.bad_epochs >= config.patience)
    record = {"epoch": state.epoch, "step": state.step, "train_loss": losses["loss"],
              "train_cls_loss": losses["classification"], "train_box_loss": losses["box_regression"],
              "val_map50": map50, "val_ap50": ap50, "lr": opt.optimizer.param_groups[0]["lr"],
              "improved": improved, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    state.history.append(clean_json(record))
    if run.main:
        logger.info("epoch %d step %d: train loss %.4f (cls %.4f, box %.4f), val mAP50 %.4f%s",
                    state.epoch, state.step, losses["loss"], losses["classification"],
                    losses["box_regression"], map50, " (best)" if improved else "")  # fmt: skip
        if run.writer is not None:
            run.writer.add_scalar("train/epoch_loss", losses["loss"], state.step)
            if math.isfinite(map50):
                run.writer.add_scalar("val/map50", map50, state.step)
            for name, value in ap50.items():
                if math.isfinite(value):
                    run.writer.add_scalar(f"val_ap50/{name}", value, state.step)
            run.writer.flush()
        if improved:
            checkpoint.save(run.config.run_dir / checkpoint.BEST,
                            {"model": unwrap(run.model).state_dict(), "epoch": state.epoch})  # fmt: skip
        _save_last(run, opt)
    barrier(run.info)


def _save_last(run: _Run, opt: Any) -> None:
    state = run.state
    checkpoint.save(run.config.run_dir / checkpoint.LAST, {
        "model": unwrap(run.model).state_dict(), **opt.state_dict(), "epoch": state.epoch,
        "step": state.step, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
        "monitor": run.monitor, "history": json.dumps(state.history),
        "rng": checkpoint.rng_state(), "task": "detection",
    })  # fmt: skip


def _restore(run: _Run, opt: Any) -> None:
    payload = checkpoint.load(run.config.run_dir / checkpoint.LAST, map_location=run.device)
    try:
        unwrap(run.model).load_state_dict(payload["model"])
        opt.load_state_dict(payload)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DetectionFitError(f"{checkpoint.LAST} does not fit this run's model: {exc}") from exc
    run.state = RunState(
        epoch=int(payload["epoch"]), step=int(payload["step"]), best_metric=payload["best_metric"],
        best_epoch=int(payload["best_epoch"]), bad_epochs=int(payload["bad_epochs"]),
        stopped_early=bool(payload["stopped_early"]) and run.config.patience > 0
        and int(payload["bad_epochs"]) >= run.config.patience,
        history=json.loads(payload["history"]),
    )  # fmt: skip
    run.monitor = str(payload.get("monitor", run.monitor))
    checkpoint.set_rng_state(payload["rng"])
    logger.info("Resumed at epoch %d, step %d (best %s at epoch %d)", run.state.epoch,
                run.state.step, run.state.best_metric, run.state.best_epoch)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Thresholds, metrics and the bundle


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


def _finish(run: _Run, started: float) -> DetectionFitResult:
    config, state, data = run.config, run.state, run.data
    barrier(run.info)
    best = config.run_dir / checkpoint.BEST
    if best.is_file():
        unwrap(run.model).load_state_dict(checkpoint.load(best, map_location=run.device)["model"])
    preds = {s: predict_split(run, s) for s in ("val", "test") if data.splits.get(s)}
    seconds = time.perf_counter() - started
    if not run.main:
        return DetectionFitResult(config.run_dir, None, state, run.monitor, {}, seconds)
    names = data.label_names
    thresholds, methods = choose_thresholds(config, names, preds["val"], data.truth("val"))
    reports = {s: evaluate_boxes(p, data.truth(s), names, thresholds) for s, p in preds.items()}
    per_label = {
        name: {"threshold": thresholds[k], "threshold_method": methods[k],
               **{s: _class_entry(r, name) for s, r in reports.items()}}
        for k, name in enumerate(names)
    }  # fmt: skip
    metrics = clean_json({
        "method": "detections matched at IoU >= 0.5 (mAP50-95: 0.50:0.05:0.95), COCO 101-point "
                  "AP; thresholds on the validation split; test: held-out patients",
        "best_epoch": state.best_epoch, "monitor": run.monitor, "best_metric": state.best_metric,
        "per_label": per_label, "summary": {s: r.all_row() for s, r in reports.items()},
        "history": state.history,
    })  # fmt: skip
    write_json(config.run_dir / METRICS, metrics)
    _write_detections(run, preds)
    bundle = _write_bundle(run, thresholds, metrics, seconds)
    record = _load_record(config.run_dir)
    record["results"] = clean_json({
        "finished": _now(), "epochs_completed": state.epoch, "steps": state.step,
        "world_size": run.info.world_size, "device": str(run.device),
        "best_epoch": state.best_epoch, "monitor": run.monitor, "best_metric": state.best_metric,
        "stopped_early": state.stopped_early, "seconds_this_session": round(seconds, 1),
        "summary": metrics["summary"], "bundle": str(bundle),
    })  # fmt: skip
    write_json(config.run_dir / RUN_CONFIG, record)
    return DetectionFitResult(config.run_dir, bundle, state, run.monitor, metrics, seconds)


def _write_detections(run: _Run, preds: dict[str, list[ImageBoxes]]) -> None:
    """``detections.csv``: every validation/test detection, boxes in source pixels."""
    names = run.data.label_names
    with (run.config.run_dir / DETECTIONS).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "split", "label", "score", "x0", "y0", "x1", "y1"])
        for split, found in preds.items():
            for i, det in zip(run.data.subset(split), found, strict=True):
                for box, k, score in zip(det.boxes, det.labels, det.scores, strict=True):
                    src = run.data.letterboxes[i].box_to_source([float(v) for v in box])
                    if src is not None:
                        writer.writerow([run.data.items[i].sop_instance_uid, split, names[k],
                                         f"{score:.6f}", *(f"{v:.2f}" for v in
                                                           (src.x0, src.y0, src.x1, src.y1))])  # fmt: skip



def _write_bundle(run: _Run, thresholds: list[float], metrics: dict[str, Any], seconds: float) -> Path:
    config, state, data = run.config, run.state, run.data
    labels = tuple(LabelSpec(n, _code(n), t) for n, t in zip(data.label_names, thresholds, strict=True))
    training = {
        "run": config.run_dir.name, "seed": config.seed, "epochs_completed": state.epoch,
        "steps": state.step, "best_epoch": state.best_epoch, "monitor": run.monitor,
        "optimizer": "AdamW", "learning_rate": config.lr, "schedule": "linear warm-up + cosine",
        "batch_size": config.batch_size, "train_crop": config.train_crop,
        "augment": config.augment, "matcher": "ATSS", "sampler": "hard negatives",
        "pretrained": bool(config.pretrained), "data": data.summary,
        "world_size": run.info.world_size, "device": run.device.type,
        "seconds_last_session": round(seconds, 1),
    }  # fmt: skip
    validation = {k: metrics[k] for k in ("method", "per_label", "summary")}
    validation["ap50"] = {n: e.get("val", {}).get("map50") for n, e in metrics["per_label"].items()}
    args = RetinaNetSpec.from_args(config.network_args).to_json()
    meta = BundleMetadata(
        name=config.name, version=config.version, labels=labels, task="detection",
        network=NetworkSpec("retinanet", args), input=config.input_spec,
        description=config.description or f"RetinaNet ({args['backbone']}) trained by training fit",
        training=training, validation_metrics=validation,
    )  # fmt: skip
    target = config.run_dir / BUNDLE_DIR
    try:
        save_bundle(target, meta, unwrap(run.model).cpu())
    except BundleError as exc:
        raise DetectionFitError(f"cannot write the bundle: {exc}") from exc
    finally:
        unwrap(run.model).to(run.device)
    logger.info("Bundle written to %s", target)
    return target
