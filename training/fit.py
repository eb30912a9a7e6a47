"""``training fit``: exported DICOM + labels -> a trained, calibrated classification bundle.

A run folder (``--out``) collects everything about one run:

``run_config.json``  every argument, library versions, git commit, data summary, results
``split.json``       patient-level train/val/test split (see :mod:`training.split`)
``data_report.txt``  how labels matched images (every mismatch, see :mod:`ai.reference.labels`)
``last.pt``          checkpoint after every epoch (see :mod:`training.checkpoint`)
``best.pt``          weights of the best validation epoch
``metrics.json``     per-label validation and test figures of the best model, history
``predictions.csv``  the best model's probabilities for every validation and test image
``tensorboard/``     TensorBoard event files
``cache/``           preprocessed arrays (unless ``--cache-dir`` or ``--no-disk-cache``)
``bundle/``          the model bundle (:func:`ai.bundle.load.save_bundle`) the node loads

Model selection monitors the validation mean AUROC (labels with both classes present; the
validation loss when none has). The best epoch's weights are scored on the validation split
to choose each label's operating threshold (Youden J) and on the held-out test split for the
figures a reader should trust; both sets of figures go into the bundle metadata.

``--resume RUN_DIR`` continues a run from ``last.pt`` with its saved configuration: same
data, split, model, optimiser, scheduler and random states, so an interrupted run ends as
the uninterrupted one would. Only the length (``--epochs``, ``--max-steps``, ``--patience``)
and the execution settings (device, workers, threads, cache, progress) may change then.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ai.bundle.architectures import network_names
from ai.bundle.load import save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import default_code, normalise_label
from ai.networks import build_network
from ai.pixels import PreprocessParams
from ai.reference.dicom_files import index_dicom_tree
from ai.reference.labels import read_classification_labels
from ai.reference.matching import LabelMatch, match_labels
from ai.types import BundleError, CodedConcept, PixelDataError
from training import checkpoint
from training.checkpoint import clean_json, git_commit, versions, write_json
from training.datasets import ClassificationDataset, ImageCache, ImageItem
from training.loop import (
    DistInfo,
    barrier,
    broadcast_object,
    calibrate_and_score,
    init_distributed,
    label_aurocs,
    make_loader,
    make_optimisation,
    mean_finite,
    predict,
    resolve_device,
    shutdown,
    train_steps,
    unwrap,
    wrap,
)
from training.losses import LOSSES, ClassificationLoss
from training.sampling import SAMPLER_MODES, EpochSampler, ShardSampler
from training.split import DEFAULT_FRACTIONS, SPLITS, PatientSplit, apply_split, patient_split

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
DATA_REPORT = "data_report.txt"
BUNDLE_DIR = "bundle"
PRIVATE_SCHEME = "99CXRAI"  # private coding scheme for labels without a standard code
RESUME_OVERRIDES = frozenset(
    {"epochs", "max_steps", "patience", "device", "num_workers", "threads", "cache_dir",
     "disk_cache", "cache_memory_mb", "progress", "log_every"}
)  # fmt: skip


class FitError(ValueError):
    """A problem with the run's inputs or state that the user can fix."""


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class FitConfig:
    """Everything one ``training fit`` run depends on (saved in ``run_config.json``)."""

    data: Path
    labels: Path
    out: Path
    task: str = "classification"
    labels_key: str = "auto"
    label_names: tuple[str, ...] = ()
    strict: bool = False
    modalities: tuple[str, ...] = ("CR", "DX")
    network: str = "densenet121"
    network_args: dict[str, Any] = field(default_factory=dict)
    pretrained: Path | None = None
    image_size: int = 224
    clahe: bool = False
    epochs: int = 20
    max_steps: int = 0  # 0: no limit
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = -1  # -1: 5 % of all steps
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0  # 0: off
    loss: str = "bce"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    sampler: str = "uniform"
    augment: bool = True
    patience: int = 5  # 0: no early stopping
    min_delta: float = 0.0
    split: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_file: Path | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    threads: int = 0  # 0: torch's default
    cache_dir: Path | None = None  # default: RUN_DIR/cache
    disk_cache: bool = True
    cache_memory_mb: int = 4096
    name: str = "cxr-classifier"
    version: str = "0.1.0"
    description: str = ""
    progress: bool = True
    log_every: int = 10

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
            (self.num_workers >= 0 and self.threads >= 0, "workers and threads must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min LR ratio {self.min_lr_ratio} must be in [0, 1]"),
            (len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and self.split[1] > 0,
             f"split {list(self.split)} must be train,val,test fractions summing to 1, val > 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise FitError(message)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def preprocess(self) -> PreprocessParams:
        return self.input_spec.preprocess_params()

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=self.image_size, channels=1, clahe=self.clahe)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON; paths absolute, so ``--resume`` works from any working directory."""
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, Path):
                doc[key] = str(value.absolute())
            elif isinstance(value, tuple):
                doc[key] = list(value)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FitConfig:
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in doc.items():
            if key not in kinds:
                continue  # written by a newer version: ignore, the rest still applies
            kind = str(kinds[key])
            if "Path" in kind and value is not None:
                value = Path(value)
            elif "tuple" in kind and value is not None:
                value = tuple(value)
            values[key] = value
        return cls(**values)


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> FitConfig:
    """The saved configuration of ``run_dir`` with the allowed ``overrides`` applied."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["args"]
    except FileNotFoundError:
        raise FitError(
            f'--resume "{run_dir}": no {RUN_CONFIG} (not a training run folder)'
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FitError(f'--resume "{run_dir}": unreadable {RUN_CONFIG}: {exc}') from exc
    config = FitConfig.from_json({**saved, "out": str(run_dir)})
    current = config.to_json()
    changed = {k: v for k, v in overrides.items() if k != "out" and current.get(k) != _jsonish(v)}
    refused = sorted(set(changed) - RESUME_OVERRIDES)
    if refused:
        raise FitError(
            f"--resume continues the saved run; these settings cannot change: {refused} "
            f"(allowed: {sorted(RESUME_OVERRIDES)}); start a new run with a new --out instead"
        )
    return replace(config, **changed)


def _jsonish(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.absolute())
    return list(value) if isinstance(value, tuple) else value


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
    """Index, match, filter and split (rank 0 only; the result is broadcast)."""
    match, excluded = _match(config, progress)
    matched = match.matched
    items = [ImageItem(m.image.path, m.image.sop_instance_uid, tuple(float(t) for t in m.targets))
             for m in matched]  # fmt: skip
    sops = [item.sop_instance_uid for item in items]
    source = config.run_dir if resume else config.split_file
    if source is not None:
        split = PatientSplit.load(Path(source))
    else:
        split = patient_split(
            sops, [m.patient_key for m in matched], [m.targets for m in matched],
            fractions=config.split, seed=config.seed, label_names=match.label_names,
        )  # fmt: skip
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


@dataclass
class RunState:
    """Counters that go into every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps
    best_metric: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FitResult:
    """What a finished run produced."""

    run_dir: Path
    bundle_dir: Path | None
    state: RunState
    monitor: str
    metrics: dict[str, Any]
    seconds: float


@dataclass
class _Run:
    """The live objects of one run (per process)."""

    config: FitConfig
    info: DistInfo
    device: torch.device
    data: PreparedData
    model: nn.Module
    loss_fn: nn.Module
    cache: ImageCache
    monitor: str
    state: RunState
    resume: bool = False
    writer: Any = None

    @property
    def main(self) -> bool:
        return self.info.is_main

    def dataset(self, split: str, augment: bool = False) -> ClassificationDataset:
        return ClassificationDataset(self.data.subset(split), self.cache, augment=augment,
                                     seed=self.config.seed)  # fmt: skip

    def eval_loader(self, split: str) -> tuple[Any, int]:
        """This rank's share of ``split`` in order (no augmentation) and the split's size."""
        ds = self.dataset(split)
        sampler = ShardSampler(len(ds), self.info.world_size, self.info.rank)
        loader = make_loader(ds, sampler, batch_size=self.config.batch_size,
                             num_workers=self.config.num_workers, drop_last=False,
                             pin_memory=self.device.type == "cuda", seed=self.config.seed)  # fmt: skip
        return loader, len(ds)


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
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    cuda = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    info = init_distributed("cuda" if cuda else "cpu")
    try:
        try:
            device = resolve_device(config.device, info)
        except (ValueError, RuntimeError) as exc:
            raise FitError(f'--device "{config.device}": {exc}') from exc
        _check_run_dir(config, resume, info)
        prepared = None
        if info.is_main:
            prepared = _prepare_on_main(config, resume)
        data: PreparedData = broadcast_object(prepared, info)
        run = _setup(config, info, device, data, resume)
        _train(run, on_epoch_end)
        result = _finish(run, started)
        barrier(info)
        return result
    finally:
        shutdown(info)
        torch.set_num_threads(threads)


def _check_run_dir(config: FitConfig, resume: bool, info: DistInfo) -> None:
    out = config.run_dir
    if resume:
        if not (out / checkpoint.LAST).is_file():
            raise FitError(f'--resume "{out}": no {checkpoint.LAST} to continue from')
        return
    if (out / checkpoint.LAST).exists():  # (a run_config alone: an attempt that never trained)
        raise FitError(f'--out "{out}" already holds a run; continue it with --resume {out} '
                       "or choose a new folder")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise FitError(f'--out "{out}" exists and is not a folder')
    if not Path(config.data).is_dir():
        raise FitError(f'--data "{config.data}" is not a folder')
    if not Path(config.labels).is_file():
        raise FitError(f'--labels "{config.labels}" is not a file')
    barrier(info)


def _prepare_on_main(config: FitConfig, resume: bool) -> PreparedData:
    out = config.run_dir
    out.mkdir(parents=True, exist_ok=True)
    data, split = prepare_data(config, resume=resume, progress=config.progress)
    (out / DATA_REPORT).write_text(data.report + "\n", encoding="utf-8")
    if not resume:
        split.save(out)
    if not data.splits.get("train") or not data.splits.get("val"):
        raise FitError(f"the split leaves no training or no validation images: "
                       f"{data.summary['splits']}")  # fmt: skip
    record = _load_record(out) if resume else {}
    record.update({"command": "training fit", "args": config.to_json(), "versions": versions(),
                   "git_commit": git_commit(), "data": data.summary})  # fmt: skip
    if resume:
        record.setdefault("resumes", []).append({"at": _now()})
    else:
        record["started"] = _now()
    write_json(out / RUN_CONFIG, clean_json(record))
    return data


def _load_record(out: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((out / RUN_CONFIG).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _setup(config: FitConfig, info: DistInfo, device: torch.device, data: PreparedData, resume: bool) -> _Run:  # fmt: skip
    model, pretrained = _build_model(config, len(data.label_names), pretrained=not resume)
    model.to(device)
    cache_dir = config.cache_dir or (config.run_dir / "cache")
    cache = ImageCache(config.preprocess, cache_dir if config.disk_cache else None,
                       memory_bytes=config.cache_memory_mb << 20)  # fmt: skip
    val_y = data.targets("val")
    both = [(val_y[:, j].min() < 1 and val_y[:, j].max() > 0) for j in range(val_y.shape[1])]
    monitor = "val_mean_auroc" if any(both) else "val_loss"
    loss_fn = ClassificationLoss(data.multi_label, config.loss, gamma=config.focal_gamma,
                                 alpha=config.focal_alpha)  # fmt: skip
    run = _Run(config, info, device, data, wrap(model, device, info), loss_fn, cache, monitor,
               RunState(), resume)  # fmt: skip
    if pretrained is not None and info.is_main:
        record = _load_record(config.run_dir)
        record["pretrained"] = pretrained
        write_json(config.run_dir / RUN_CONFIG, clean_json(record))
    _warm_cache(run)
    return run


def _warm_cache(run: _Run) -> None:
    """Decode every image once (this rank's share), so a bad file stops the run up front
    with its SOP Instance UID instead of in the middle of an epoch."""
    items = run.data.items
    mine = items[run.info.rank :: run.info.world_size]
    bar = tqdm(mine, desc="preprocess", unit="img", disable=not (run.config.progress and run.main))
    for item in bar:
        try:
            run.cache.get(item)
        except PixelDataError as exc:
            raise FitError(f"cannot preprocess an image: {exc}") from exc
    barrier(run.info)


def _steps_per_epoch(sampler: EpochSampler, batch_size: int) -> tuple[int, bool]:
    drop_last = len(sampler) > batch_size  # BatchNorm dislikes a last batch of one
    n = len(sampler) // batch_size if drop_last else math.ceil(len(sampler) / batch_size)
    return max(n, 1), drop_last


def _train(run: _Run, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
    config, info = run.config, run.info
    train_ds = run.dataset("train", augment=config.augment)
    sampler = EpochSampler(len(train_ds), mode=config.sampler, targets=train_ds.targets,
                           multi_label=run.data.multi_label, num_replicas=info.world_size,
                           rank=info.rank, seed=config.seed)  # fmt: skip
    per_epoch, drop_last = _steps_per_epoch(sampler, config.batch_size)
    total = per_epoch * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    warmup = config.warmup_steps if config.warmup_steps >= 0 else round(0.05 * total)
    opt = make_optimisation(run.model, run.device, lr=config.lr, weight_decay=config.weight_decay,
                            total_steps=total, warmup_steps=warmup,
                            min_lr_ratio=config.min_lr_ratio, amp=config.amp,
                            clip_grad=config.clip_grad)  # fmt: skip
    if run.resume:
        _restore(run, opt)
    loader = make_loader(train_ds, sampler, batch_size=config.batch_size,
                         num_workers=config.num_workers, drop_last=drop_last,
                         pin_memory=run.device.type == "cuda", seed=config.seed)  # fmt: skip
    val_loader, n_val = run.eval_loader("val")
    if run.main:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where used

        run.writer = SummaryWriter(
            str(config.run_dir / "tensorboard"), purge_step=run.state.step or None
        )
    logger.info("Training: %d images, %d steps per epoch, %d steps in all (monitor %s)",
                len(train_ds), per_epoch, total, run.monitor)  # fmt: skip
    state = run.state
    try:
        while state.epoch < config.epochs and state.step < total and not state.stopped_early:
            _epoch(run, opt, sampler, loader, val_loader, n_val, per_epoch, total)
            if on_epoch_end is not None:
                on_epoch_end(dict(state.history[-1]))
    finally:
        if run.writer is not None:
            run.writer.close()


def _epoch(run: _Run, opt: Any, sampler: EpochSampler, loader: Any, val_loader: Any, n_val: int,
           per_epoch: int, total: int) -> None:  # fmt: skip
    config, state = run.config, run.state
    sampler.set_epoch(state.epoch)
    budget = min(per_epoch, total - state.step)
    t0 = time.perf_counter()

    def on_step(loss: float, lr: float) -> None:
        state.step += 1
        if run.writer is not None and state.step % max(config.log_every, 1) == 0:
            run.writer.add_scalar("train/loss", loss, state.step)
            run.writer.add_scalar("train/lr", lr, state.step)

    bar = tqdm(total=budget, desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="step",
               disable=not (config.progress and run.main), leave=False)  # fmt: skip
    with bar:
        _, train_loss = train_steps(run.model, loader, run.loss_fn, opt, run.device,
                                    max_steps=budget, on_step=on_step, progress=bar)  # fmt: skip
    probs, val_loss = predict(run.model, val_loader, run.device, n_val,
                              multi_label=run.data.multi_label, loss_fn=run.loss_fn,
                              info=run.info, amp=opt.amp)  # fmt: skip
    aurocs = label_aurocs(run.data.targets("val"), probs, run.data.label_names)
    mean_auc = mean_finite(aurocs.values())
    metric = mean_auc if run.monitor == "val_mean_auroc" else val_loss
    state.epoch += 1
    improved = _improved(metric, state.best_metric, run.monitor, config.min_delta)
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = float(metric), state.epoch, 0
    else:
        state.bad_epochs += 1
    state.stopped_early = bool(config.patience and state.bad_epochs >= config.patience)
    record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
              "val_loss": val_loss, "val_mean_auroc": mean_auc, "val_auroc": aurocs,
              "lr": opt.optimizer.param_groups[0]["lr"], "improved": improved,
              "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    state.history.append(clean_json(record))
    _log_epoch(run, record)
    if run.main:
        if improved:
            checkpoint.save(config.run_dir / checkpoint.BEST,
                            {"model": unwrap(run.model).state_dict(), "epoch": state.epoch})  # fmt: skip
        _save_last(run, opt)
    barrier(run.info)


def _improved(metric: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if not math.isfinite(metric):
        return best is None
    if best is None:
        return True
    return metric > best + min_delta if monitor == "val_mean_auroc" else metric < best - min_delta


def _log_epoch(run: _Run, record: dict[str, Any]) -> None:
    if not run.main:
        return
    logger.info("epoch %d step %d: train loss %.4f, val loss %.4f, val mean AUROC %.4f%s",
                record["epoch"], record["step"], record["train_loss"], record["val_loss"],
                record["val_mean_auroc"], " (best)" if record["improved"] else "")  # fmt: skip
    if run.writer is None:
        return
    step = record["step"]
    run.writer.add_scalar("val/loss", record["val_loss"], step)
    if math.isfinite(record["val_mean_auroc"]):
        run.writer.add_scalar("val/mean_auroc", record["val_mean_auroc"], step)
    for name, value in record["val_auroc"].items():
        if math.isfinite(value):
            run.writer.add_scalar(f"val_auroc/{name}", value, step)
    run.writer.add_scalar("train/epoch_loss", record["train_loss"], step)
    run.writer.flush()


def _save_last(run: _Run, opt: Any) -> None:
    state = run.state
    payload = {
        "model": unwrap(run.model).state_dict(),
        **opt.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "monitor": run.monitor,
        "history": json.dumps(state.history),
        "rng": checkpoint.rng_state(),
    }
    checkpoint.save(run.config.run_dir / checkpoint.LAST, payload)


def _restore(run: _Run, opt: Any) -> None:
    payload = checkpoint.load(run.config.run_dir / checkpoint.LAST, map_location=run.device)
    try:
        unwrap(run.model).load_state_dict(payload["model"])
        opt.load_state_dict(payload)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise FitError(f"{checkpoint.LAST} does not fit this run's model: {exc}") from exc
    run.state = RunState(
        epoch=int(payload["epoch"]), step=int(payload["step"]),
        best_metric=payload["best_metric"], best_epoch=int(payload["best_epoch"]),
        bad_epochs=int(payload["bad_epochs"]),
        stopped_early=bool(payload["stopped_early"]) and run.config.patience > 0
        and int(payload["bad_epochs"]) >= run.config.patience,
        history=json.loads(payload["history"]),
    )  # fmt: skip
    run.monitor = str(payload.get("monitor", run.monitor))
    checkpoint.set_rng_state(payload["rng"])
    logger.info("Resumed at epoch %d, step %d (best %s at epoch %d)", run.state.epoch,
                run.state.step, run.state.best_metric, run.state.best_epoch)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Calibration, metrics and the bundle


def _code(name: str) -> CodedConcept:
    code = default_code(name)
    if code is not None:
        return code
    logger.warning('Label "%s" has no standard code; using private scheme %s', name, PRIVATE_SCHEME)
    return CodedConcept(normalise_label(name).upper()[:16], PRIVATE_SCHEME, name)


def _finish(run: _Run, started: float) -> FitResult:
    config, state = run.config, run.state
    best = config.run_dir / checkpoint.BEST
    barrier(run.info)
    if best.is_file():
        unwrap(run.model).load_state_dict(checkpoint.load(best, map_location=run.device)["model"])
    predictions = {}
    for split in ("val", "test"):
        if not run.data.splits.get(split):
            continue
        loader, n = run.eval_loader(split)
        probs, _ = predict(run.model, loader, run.device, n, multi_label=run.data.multi_label,
                           info=run.info)  # fmt: skip
        predictions[split] = (run.data.targets(split), probs)
    seconds = time.perf_counter() - started
    if not run.main:
        return FitResult(config.run_dir, None, state, run.monitor, {}, seconds)
    thresholds, metrics = calibrate_and_score(run.data.label_names, predictions)
    metrics = clean_json({
        "method": "thresholds: Youden J on the validation split; test: held-out patients",
        "best_epoch": state.best_epoch, "monitor": run.monitor, "best_metric": state.best_metric,
        **metrics, "history": state.history,
    })  # fmt: skip
    write_json(config.run_dir / METRICS, metrics)
    _write_predictions(run, predictions)
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
    return FitResult(config.run_dir, bundle, state, run.monitor, metrics, seconds)


def _write_predictions(run: _Run, predictions: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``predictions.csv``: the best model's probabilities per validation/test image."""
    names = run.data.label_names
    header = [
        "sop_instance_uid",
        "split",
        *(f"true_{n}" for n in names),
        *(f"prob_{n}" for n in names),
    ]
    with (run.config.run_dir / PREDICTIONS).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for split, (truth, probs) in predictions.items():
            for item, y, p in zip(run.data.subset(split), truth, probs, strict=True):
                writer.writerow([item.sop_instance_uid, split, *(int(v) for v in y),
                                 *(f"{v:.6f}" for v in p)])  # fmt: skip


def _write_bundle(
    run: _Run, thresholds: list[float], metrics: dict[str, Any], seconds: float
) -> Path:
    config, state, data = run.config, run.state, run.data
    labels = tuple(
        LabelSpec(n, _code(n), t) for n, t in zip(data.label_names, thresholds, strict=True)
    )
    training = {
        "run": config.run_dir.name, "seed": config.seed, "epochs_completed": state.epoch,
        "steps": state.step, "best_epoch": state.best_epoch, "monitor": run.monitor,
        "loss": config.loss, "sampler": config.sampler, "optimizer": "AdamW",
        "learning_rate": config.lr, "schedule": "linear warm-up + cosine",
        "batch_size": config.batch_size, "augment": config.augment,
        "pretrained": bool(config.pretrained), "data": data.summary,
        "world_size": run.info.world_size, "device": run.device.type,
        "seconds_last_session": round(seconds, 1),
    }  # fmt: skip
    validation = {k: metrics[k] for k in ("method", "per_label", "summary")}
    meta = BundleMetadata(
        name=config.name, version=config.version, labels=labels,
        network=NetworkSpec(config.network, dict(config.network_args)), task="classification",
        multi_label=data.multi_label, input=config.input_spec,
        description=config.description or f"{config.network} trained by training fit",
        training=training, validation_metrics=validation,
    )  # fmt: skip
    target = config.run_dir / BUNDLE_DIR
    try:
        save_bundle(target, meta, unwrap(run.model).cpu())
    except BundleError as exc:
        raise FitError(f"cannot write the bundle: {exc}") from exc
    finally:
        unwrap(run.model).to(run.device)
    logger.info("Bundle written to %s", target)
    return target
