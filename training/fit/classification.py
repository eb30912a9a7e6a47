"""``training fit``: exported DICOM + labels -> a trained, calibrated classification bundle.

The classification task of the fit engine (:mod:`training.fit.engine`, which owns the run
folder, the epoch loop, resume and the bundle writing): labels from a CSV (multi-label 0/1
columns or one multi-class ``label`` column), the network of ``--network``, BCE/CE or focal
loss, a uniform, weighted or oversampling sampler, ``predictions.csv``.

Model selection monitors the validation mean AUROC (labels with both classes present; the
validation loss when none has). The best epoch's weights are scored on the validation split
to choose each label's operating threshold (Youden J) and on the held-out test split for the
figures a reader should trust; both sets of figures go into the bundle metadata.

(The issue's layout names this module after the task; its public names, ``FitConfig`` and
``fit``, are those of the former ``training/fit.py``. The training step and the probability
gathering, formerly in ``training/loop.py``, are here because only this task uses them.)
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ai.bundle.architectures import default_gradcam_layer, network_names
from ai.bundle.metadata import BundleMetadata, LabelSpec, NetworkSpec
from ai.networks import build_network
from ai.reference.dicom_files import index_dicom_tree
from ai.reference.labels import read_classification_labels
from ai.reference.matching import LabelMatch, match_labels
from ai.reference.metrics import auroc, auroc_estimate, binary_metrics_at, youden_threshold
from ai.types import BundleError
from training import nih
from training.datasets import ClassificationDataset, ImageItem
from training.errors import FitError
from training.fit import checkpoint
from training.fit.distributed import DistInfo, unwrap
from training.fit.engine import FitResult, Run, RunConfig, run_fit, run_split
from training.fit.guidance import (
    AllowedRegion,
    Guidance,
    GuidedDataset,
    load_allowed,
    sidecar_for,
)
from training.fit.optimisation import OPTIMIZERS, SCHEDULES, Optimisation, optimizer_step
from training.losses import LOSSES, ClassificationLoss
from training.sampling import SAMPLER_MODES, EpochSampler
from training.split import SPLITS, PatientSplit, apply_split

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class FitConfig(RunConfig):
    """Everything one ``training fit`` run depends on (saved in ``run_config.json``)."""

    task: str = "classification"
    network: str = "densenet121"
    image_size: int = 224
    epochs: int = 20
    batch_size: int = 16
    clip_grad: float = 1.0
    patience: int = 5
    name: str = "cxr-classifier"
    labels_key: str = "auto"
    loss: str = "bce"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    sampler: str = "uniform"
    split_lists: Path | None = None  # NIH train_val_list.txt / test_list.txt folder
    preset: str = ""  # recorded only: the CLI expands a preset into the fields above
    gradcam_guidance: float = 0.0  # weight of the Grad-CAM outside-the-lungs term (0: off)

    def __post_init__(self) -> None:
        checks = [
            (self.task == "classification", f'task "{self.task}": this trainer fits classification'),
            (self.network in network_names(), f'network "{self.network}" is not one of {network_names()}'),
            (self.image_size >= 16, f"image size {self.image_size} must be at least 16"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch size must be at least 1"),
            (self.max_steps >= 0 and self.patience >= 0, "max steps and patience must be >= 0"),
            (self.lr > 0 and self.weight_decay >= 0, f"lr {self.lr} must be > 0, weight decay >= 0"),
            (self.loss in LOSSES, f'loss "{self.loss}" must be one of {list(LOSSES)}'),
            (self.sampler in SAMPLER_MODES, f'sampler "{self.sampler}" must be one of {list(SAMPLER_MODES)}'),
            (self.optimizer in OPTIMIZERS, f'optimizer "{self.optimizer}" must be one of {list(OPTIMIZERS)}'),
            (self.schedule in SCHEDULES, f'schedule "{self.schedule}" must be one of {list(SCHEDULES)}'),
            (self.num_workers >= 0 and self.threads >= 0, "workers and threads must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min LR ratio {self.min_lr_ratio} must be in [0, 1]"),
            (math.isfinite(self.gradcam_guidance) and self.gradcam_guidance >= 0,
             f"--gradcam-guidance {self.gradcam_guidance} must be a finite weight >= 0"),
            (len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and self.split[1] > 0,
             f"split {list(self.split)} must be train,val,test fractions summing to 1, val > 0"),
        ]  # fmt: skip
        self.check(checks)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    """Matched images, labels and split: what every rank trains on."""

    label_names: tuple[str, ...]
    multi_label: bool
    items: list[ImageItem]
    splits: dict[str, list[int]]  # split name -> indexes into items
    summary: dict[str, Any]
    report: str

    def subset(self, name: str) -> list[ImageItem]:
        return [self.items[i] for i in self.splits.get(name, [])]

    def targets(self, name: str) -> np.ndarray:
        rows = [self.items[i].targets for i in self.splits.get(name, [])]
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(self.label_names))


def _match(config: FitConfig, progress: bool) -> tuple[LabelMatch, list[str]]:
    with tqdm(desc="index DICOM", unit="file", disable=not progress) as bar:
        index = index_dicom_tree(config.data, progress=bar.update)
    labels = read_classification_labels(
        config.labels, config.label_names or None, key=config.labels_key
    )
    match = match_labels(index, labels, strict=config.strict)
    excluded: list[str] = []
    if config.modalities:
        allowed = {m.upper() for m in config.modalities}
        kept = [m for m in match.matched if m.image.modality in allowed]
        excluded = [
            f"sop={m.image.sop_instance_uid}: modality {m.image.modality or '(none)'}"
            for m in match.matched if m.image.modality not in allowed
        ]  # fmt: skip
        match.matched = kept
    match.check(strict=False)  # raises when nothing matched
    return match, excluded


def prepare_data(
    config: FitConfig, *, resume: bool, progress: bool
) -> tuple[PreparedData, PatientSplit]:
    """Index, match, filter and split (rank 0 only; the result is broadcast). A ChestX-ray14
    label file (``Image Index``, ``Finding Labels``) is read in its own layout."""
    if nih.is_nih_layout(config.labels):
        return _prepare_nih(config, resume=resume)
    match, excluded = _match(config, progress)
    matched = match.matched
    items = [ImageItem(m.image.path, m.image.sop_instance_uid, tuple(float(t) for t in m.targets))
             for m in matched]  # fmt: skip
    sops = [item.sop_instance_uid for item in items]
    split = run_split(config, resume=resume, sops=sops, matched=matched,
                      label_names=match.label_names)  # fmt: skip
    indexes = apply_split(split, sops)
    report = match.report()
    if excluded:
        report += f"\nexcluded by --modalities {','.join(config.modalities)}: {len(excluded)}\n"
        report += "\n".join(f"  - {line}" for line in excluded[:20])
    prepared = PreparedData(match.label_names, match.multi_label, items, indexes, {}, report)
    prepared.summary = {
        "images": len(items),
        "patients": len({m.patient_key for m in matched}),
        "labels": list(match.label_names),
        "multi_label": match.multi_label,
        "match": match.summary(),
        "excluded_modality": len(excluded),
        "splits": {name: _split_summary(prepared, name) for name in SPLITS},
    }
    return prepared, split


def _prepare_nih(config: FitConfig, *, resume: bool) -> tuple[PreparedData, PatientSplit]:
    """ChestX-ray14: label rows -> image files under ``--data`` (PNG / JPEG / DICOM named by
    ``Image Index``) -> patient-level or official split (see :mod:`training.nih`)."""
    records = nih.read_labels(config.labels)
    names = tuple(config.label_names) or nih.NIH_LABELS
    nih.check_label_names(records, names)
    files = nih.find_images(config.data, (r.image for r in records))
    missing = [r.image for r in records if r.image not in files]
    if missing and config.strict:
        raise FitError(f"{len(missing)} labelled image(s) have no file under --data "
                       f'(first: "{missing[0]}")')  # fmt: skip
    rows = len(records)
    records = [r for r in records if r.image in files]
    if not records:
        raise FitError(f'no image named in --labels "{config.labels}" is under --data "{config.data}"')
    y = nih.targets(records, names)
    source = config.run_dir if resume else config.split_file
    if source is not None:
        split = PatientSplit.load(Path(source))
    else:
        lists = nih.read_split_lists(config.split_lists) if config.split_lists else None
        split = nih.split_records(records, y, fractions=config.split, seed=config.seed,
                                  label_names=names, lists=lists)  # fmt: skip
    listed = {uid for uids in split.sop_uids.values() for uid in uids}
    keep = [i for i, r in enumerate(records) if r.image in listed]
    records, y = [records[i] for i in keep], y[keep]
    items = [ImageItem(files[r.image], r.image, tuple(float(v) for v in row))
             for r, row in zip(records, y, strict=True)]  # fmt: skip
    indexes = apply_split(split, [r.image for r in records])
    views = dict(Counter(r.view or "(none)" for r in records))
    report = (f"NIH ChestX-ray14 labels: {rows} rows, {len(files)} with an image file, "
              f"{len(missing)} without (first: {missing[:3]}); {len(records)} used; "
              f"views {views}; split {'official lists' if config.split_lists else 'by patient'}")  # fmt: skip
    prepared = PreparedData(names, True, items, indexes, {}, report)
    prepared.summary = {
        "images": len(items), "patients": len({r.patient for r in records}),
        "labels": list(names), "multi_label": True, "layout": "nih-chestxray14",
        "match": {"label_rows": rows, "with_file": len(files), "missing_file": len(missing)},
        "views": views, "official_split": config.split_lists is not None,
        "splits": {name: _split_summary(prepared, name) for name in SPLITS},
    }  # fmt: skip
    return prepared, split


def _split_summary(data: PreparedData, name: str) -> dict[str, Any]:
    y = data.targets(name)
    return {
        "images": int(len(y)),
        "positives": {label: int(y[:, j].sum()) for j, label in enumerate(data.label_names)},
    }


# --------------------------------------------------------------------------------------------
# Model


def _build_model(
    config: FitConfig, num_classes: int, *, pretrained: bool = True
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network, seeded from ``config.seed``, with ``--pretrained`` weights (unless
    resuming: the checkpoint has the weights then)."""
    torch.manual_seed(config.seed)
    try:
        model = build_network(config.network, config.network_args, num_classes=num_classes).module
    except BundleError as exc:
        raise FitError(str(exc)) from exc
    if not (pretrained and config.pretrained):
        return model, None
    report = checkpoint.load_pretrained(model, config.pretrained)
    return model, report


# --------------------------------------------------------------------------------------------
# The run


def fit(
    config: FitConfig,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train (or continue, ``resume=True``) a classification run; see the module docstring.

    ``on_epoch_end(record)`` is called on every rank after each epoch's checkpoint is
    written (tests use it to interrupt a run).
    """
    result = run_fit(ClassificationRun, config, resume=resume, on_epoch_end=on_epoch_end)
    per_label = result.metrics.get("per_label", {})
    if result.bundle_dir is not None and set(per_label) & set(nih.NIH_LABELS):
        split = "test" if any("test" in e for e in per_label.values()) else "val"
        table = nih.chexnet_table(per_label, split)
        (result.run_dir / nih.TABLE_FILE).write_text(
            f"# ChestX-ray14 AUROC per pathology (CheXNet paper layout)\n\n{table}", encoding="utf-8")
    return result


@dataclass
class ClassificationRun(Run):
    """The classification hooks of the engine's run."""

    command = "training fit"
    metrics_method = "thresholds: Youden J on the validation split; test: held-out patients"
    loss_fn: nn.Module = field(init=False)
    _val_loader: Any = field(init=False, default=None)
    guidance: Guidance | None = field(init=False, default=None)
    _allowed: dict[str, AllowedRegion] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        config = self.config
        fraction = None
        if config.loss == "weighted-bce":
            if not self.data.multi_label:
                raise FitError("--loss weighted-bce needs multi-label (0/1 column) labels")
            fraction = torch.from_numpy(self.data.targets("train").mean(axis=0))
        self.loss_fn = ClassificationLoss(self.data.multi_label, config.loss,
                                          gamma=config.focal_gamma, alpha=config.focal_alpha,
                                          positive_fraction=fraction)  # fmt: skip
        if config.gradcam_guidance > 0:
            self._guide()

    def _guide(self) -> None:
        """``--gradcam-guidance``: the training images' allowed regions and the hook (see
        :mod:`training.fit.guidance`)."""
        config, train = self.config, self.data.subset("train")
        if self.info.world_size > 1:
            raise FitError("--gradcam-guidance needs torch.autograd.grad, which "
                           "DistributedDataParallel does not support: train in one process")  # fmt: skip
        self._allowed = load_allowed(config.data, config.labels, train, self.data.label_names,
                                     config.image_size)  # fmt: skip
        if not self._allowed:
            raise FitError(f"--gradcam-guidance: none of the {len(train)} training images has "
                           f"a lung mask in {sidecar_for(config.labels).name}")  # fmt: skip
        layer = default_gradcam_layer(config.network)
        self.guidance = Guidance.attach(unwrap(self.model), layer, config.gradcam_guidance)

    @classmethod
    def check_labels(cls, config: Any) -> None:
        if not Path(config.labels).is_file():
            raise FitError(f'--labels "{config.labels}" is not a file')
        if config.gradcam_guidance > 0:
            sidecar_for(config.labels)  # before any work: the masks must exist

    @classmethod
    def prepare(cls, config: Any, *, resume: bool, progress: bool) -> tuple[Any, PatientSplit]:
        return prepare_data(config, resume=resume, progress=progress)

    @classmethod
    def build_model(cls, config: Any, data: Any, resume: bool) -> tuple[nn.Module, dict | None]:
        return _build_model(config, len(data.label_names), pretrained=not resume)

    @classmethod
    def choose_monitor(cls, data: Any) -> str:
        val_y = data.targets("val")
        both = [(val_y[:, j].min() < 1 and val_y[:, j].max() > 0) for j in range(val_y.shape[1])]
        return "val_mean_auroc" if any(both) else "val_loss"

    def dataset(self, split: str, augment: bool = False) -> ClassificationDataset:
        return ClassificationDataset(self.data.subset(split), self.cache, augment=augment,
                                     seed=self.config.seed)  # fmt: skip

    def eval_dataset(self, split: str) -> ClassificationDataset:
        return self.dataset(split)

    def train_parts(self) -> tuple[ClassificationDataset, EpochSampler]:
        config, info = self.config, self.info
        if self.guidance is None:
            train_ds = self.dataset("train", augment=config.augment)
        else:
            train_ds = GuidedDataset(self.data.subset("train"), self.cache, self._allowed,
                                     augment=config.augment, seed=config.seed)  # fmt: skip
        sampler = EpochSampler(len(train_ds), mode=config.sampler, targets=train_ds.targets,
                               multi_label=self.data.multi_label, num_replicas=info.world_size,
                               rank=info.rank, seed=config.seed)  # fmt: skip
        return train_ds, sampler

    def train_epoch(
        self, opt: Optimisation, loader: Any, budget: int, bar: Any
    ) -> dict[str, float]:
        state, writer, every = self.state, self.writer, max(self.config.log_every, 1)

        def on_step(loss: float, lr: float) -> None:
            state.step += 1
            if writer is not None and state.step % every == 0:
                writer.add_scalar("train/loss", loss, state.step)
                writer.add_scalar("train/lr", lr, state.step)

        _, train_loss = train_steps(self.model, loader, self.loss_fn, opt, self.device,
                                    max_steps=budget, on_step=on_step, progress=bar,
                                    guidance=self.guidance)  # fmt: skip
        if self.guidance is None:
            return {"train_loss": train_loss}
        return {"train_loss": train_loss, "gradcam_outside": self.guidance.epoch_mean()}

    def validate(self, opt: Optimisation) -> tuple[float, dict[str, Any]]:
        if self._val_loader is None:
            self._val_loader = self.eval_loader("val")
        n_val = len(self.data.splits.get("val", []))
        probs, val_loss = predict(self.model, self._val_loader, self.device, n_val,
                                  multi_label=self.data.multi_label, loss_fn=self.loss_fn,
                                  info=self.info, amp=opt.amp)  # fmt: skip
        aurocs = label_aurocs(self.data.targets("val"), probs, self.data.label_names)
        mean_auc = mean_finite(aurocs.values())
        metric = mean_auc if self.monitor == "val_mean_auroc" else val_loss
        return metric, {"val_loss": val_loss, "val_mean_auroc": mean_auc, "val_auroc": aurocs}

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        logger.info("epoch %d step %d: train loss %.4f, val loss %.4f, val mean AUROC %.4f%s",
                    record["epoch"], record["step"], record["train_loss"], record["val_loss"],
                    record["val_mean_auroc"], " (best)" if record["improved"] else "")  # fmt: skip
        writer = self.writer
        if writer is None:
            return
        step = record["step"]
        writer.add_scalar("val/loss", record["val_loss"], step)
        if math.isfinite(record["val_mean_auroc"]):
            writer.add_scalar("val/mean_auroc", record["val_mean_auroc"], step)
        for name, value in record["val_auroc"].items():
            if math.isfinite(value):
                writer.add_scalar(f"val_auroc/{name}", value, step)
        writer.add_scalar("train/epoch_loss", record["train_loss"], step)
        writer.flush()

    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.data.splits.get(split, []))
        probs, _ = predict(self.model, self.eval_loader(split), self.device, n,
                           multi_label=self.data.multi_label, info=self.info)  # fmt: skip
        return self.data.targets(split), probs

    def score(self, predictions: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
        return calibrate_and_score(self.data.label_names, predictions)

    def write_predictions(self, predictions: dict[str, Any]) -> None:
        """``predictions.csv``: the best model's probabilities per validation/test image."""
        names = self.data.label_names
        header = [
            "sop_instance_uid",
            "split",
            *(f"true_{n}" for n in names),
            *(f"prob_{n}" for n in names),
        ]
        with (self.config.run_dir / PREDICTIONS).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for split, (truth, probs) in predictions.items():
                for item, y, p in zip(self.data.subset(split), truth, probs, strict=True):
                    writer.writerow([item.sop_instance_uid, split, *(int(v) for v in y),
                                     *(f"{v:.6f}" for v in p)])  # fmt: skip

    def training_record(self) -> dict[str, Any]:
        config = self.config
        schedule = ("linear warm-up + cosine" if config.schedule == "cosine"
                    else "LR / 10 on validation-loss plateau")  # fmt: skip
        record = {
            "loss": config.loss, "sampler": config.sampler,
            "optimizer": {"adamw": "AdamW", "adam": "Adam"}[config.optimizer],
            "learning_rate": config.lr, "schedule": schedule, "preset": config.preset or None,
            "batch_size": config.batch_size, "augment": config.augment,
        }  # fmt: skip
        if self.guidance is not None:  # off: the record of a plain fit, unchanged
            record["gradcam_guidance"] = {
                "weight": config.gradcam_guidance,
                "layer": default_gradcam_layer(config.network),
                "region": "lung mask + the label's own boxes (locations.json)",
                "train_images_with_mask": len(self._allowed),
            }
        return record

    def metadata(self, labels: tuple[LabelSpec, ...], training: dict[str, Any],
                 metrics: dict[str, Any]) -> BundleMetadata:  # fmt: skip
        config = self.config
        return BundleMetadata(
            name=config.name, version=config.version, labels=labels,
            network=NetworkSpec(config.network, dict(config.network_args)),
            task="classification", multi_label=self.data.multi_label, input=config.input_spec,
            description=config.description or f"{config.network} trained by training fit",
            training=training,
            validation_metrics={k: metrics[k] for k in ("method", "per_label", "summary")},
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Training step and evaluation (per rank, gathered over ranks)


def train_steps(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    opt: Optimisation,
    device: torch.device,
    *,
    max_steps: int,
    on_step: Any = None,
    progress: tqdm | None = None,
    guidance: Guidance | None = None,
) -> tuple[int, float]:
    """Train until ``loader`` ends or ``max_steps`` steps were taken in this call.

    Returns (steps taken, mean training loss). ``on_step(loss, lr)`` runs after each step.
    ``guidance`` adds the Grad-CAM term (:mod:`training.fit.guidance`) to the loss.
    """
    model.train()
    steps, total = 0, 0.0
    for batch in loader:
        if steps >= max_steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=opt.amp):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        if guidance is not None:
            loss = loss + guidance.term(logits, batch, device)
        optimizer_step(opt, model, loss)
        value = float(loss.detach())
        steps, total = steps + 1, total + value
        if on_step is not None:
            on_step(value, opt.optimizer.param_groups[0]["lr"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}")
    return steps, total / max(steps, 1)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    size: int,
    *,
    multi_label: bool,
    loss_fn: nn.Module | None = None,
    info: DistInfo | None = None,
    amp: bool = False,
) -> tuple[np.ndarray, float]:
    """Probabilities (size, labels) in dataset order, gathered over ranks, and the mean loss."""
    info = info or DistInfo()
    model.eval()
    indices: list[int] = []
    chunks: list[np.ndarray] = []
    loss_sum = 0.0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(images).float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, batch["target"].to(device))) * len(images)
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        chunks.append(probs.cpu().numpy())
        indices.extend(int(i) for i in batch["index"])
    local = (indices, np.concatenate(chunks) if chunks else None, loss_sum)
    parts = [local]
    if info.distributed:
        parts = [None] * info.world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, local)
    out: np.ndarray | None = None
    total_loss = 0.0
    for part_indices, part_probs, part_loss in parts:
        total_loss += part_loss
        if part_probs is None:
            continue
        if out is None:
            out = np.full((size, part_probs.shape[1]), np.nan, dtype=np.float64)
        out[np.asarray(part_indices)] = part_probs
    if out is None or np.isnan(out).any():
        raise RuntimeError("evaluation did not cover every image")
    return out, total_loss / max(size, 1)


def label_aurocs(targets: np.ndarray, probs: np.ndarray, names: Iterable[str]) -> dict[str, float]:
    """AUROC per label (NaN where a label lacks positives or negatives)."""
    return {name: auroc(targets[:, j].astype(int), probs[:, j]) for j, name in enumerate(names)}


def mean_finite(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _label_figures(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any] | None:
    if len(y) == 0:
        return None
    m = binary_metrics_at(y.astype(int), scores, threshold)
    return {
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
        **m.as_dict(),
        "auroc": auroc_estimate(y.astype(int), scores, n_boot=1000).as_dict(),
    }


def calibrate_and_score(
    names: tuple[str, ...], predictions: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[list[float], dict[str, Any]]:
    """Youden J thresholds on ``predictions["val"]``; figures for every split given."""
    y_val, p_val = predictions["val"]
    thresholds: list[float] = []
    per_label: dict[str, Any] = {}
    for j, name in enumerate(names):
        try:
            threshold, method = (
                float(youden_threshold(y_val[:, j].astype(int), p_val[:, j])),
                "youden",
            )
        except ValueError:
            threshold, method = 0.5, "default (validation lacks positives or negatives)"
        threshold = min(max(threshold, 0.0), 1.0)
        thresholds.append(threshold)
        entry: dict[str, Any] = {"threshold": threshold, "threshold_method": method}
        for split, (y, p) in predictions.items():
            figures = _label_figures(y[:, j], p[:, j], threshold)
            if figures is not None:
                entry[split] = figures
        per_label[name] = entry
    summary: dict[str, Any] = {}
    for split, (y, _) in predictions.items():
        aucs = [per_label[n].get(split, {}).get("auroc", {}).get("value") for n in names]
        summary[split] = {
            "images": int(len(y)),
            "mean_auroc": mean_finite(a for a in aucs if a is not None),
        }
    return thresholds, {"per_label": per_label, "summary": summary}
