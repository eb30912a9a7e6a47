"""The fit engine: what a ``training fit`` run does whatever its task.

A run folder (``--out``) collects everything about one run:

``run_config.json``  every argument, library versions, git commit, data summary, results
``split.json``       patient-level train/val/test split (see :mod:`training.split`)
``data_report.txt``  how labels matched images (every mismatch, see :mod:`ai.reference.matching`)
``last.pt``          checkpoint after every epoch (see :mod:`training.fit.checkpoint`)
``best.pt``          weights of the best validation epoch
``metrics.json``     per-label validation and test figures of the best model, history
``predictions.csv``  (classification) or ``detections.csv`` (detection): the best model's
                     output for every validation and test image
``tensorboard/``     TensorBoard event files
``cache/``           preprocessed arrays (unless ``--cache-dir`` or ``--no-disk-cache``)
``bundle/``          the model bundle (:func:`ai.bundle.load.save_bundle`) the node loads

:class:`Run` is the skeleton every task shares: run folder checks, preparing the data on
rank 0 and broadcasting it, the epoch loop (optimiser steps, validation, early stopping,
TensorBoard, ``best.pt`` / ``last.pt``), resume, scoring the best epoch and writing the
metrics, the record and the bundle. A task (:mod:`training.fit.classification`,
:mod:`training.fit.detection`) subclasses it and fills in the hooks: its data, model, loss
and training step, validation metric, thresholds and bundle metadata.

``--resume RUN_DIR`` continues a run from ``last.pt`` with its saved configuration: same
data, split, model, optimiser, scheduler and random states, so an interrupted run ends as
the uninterrupted one would. Only the length (``--epochs``, ``--max-steps``, ``--patience``)
and the execution settings (device, workers, threads, cache, progress) may change then.

(The issue's layout put the run folder, record, checkpoint and ``RunState`` here; the
checkpoint file format kept its own module, :mod:`training.fit.checkpoint`, and the
process/device and optimiser parts of the former ``training/loop.py`` became
:mod:`training.fit.distributed` and :mod:`training.fit.optimisation`, so that no module
passes 800 lines.)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ai.bundle.load import save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec
from ai.codes import default_code, normalise_label
from ai.pixels import PreprocessParams
from ai.reference.matching import MatchedImage
from ai.types import BundleError, CodedConcept, PixelDataError
from training.datasets import ImageCache
from training.errors import FitError
from training.fit import checkpoint
from training.fit.checkpoint import clean_json, git_commit, versions, write_json
from training.fit.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    init_distributed,
    resolve_device,
    shutdown,
    unwrap,
    wrap,
)
from training.fit.optimisation import Optimisation, make_optimisation
from training.ood import gate_run
from training.sampling import EpochSampler, ShardSampler
from training.split import DEFAULT_FRACTIONS, PatientSplit, patient_split

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
DATA_REPORT = "data_report.txt"
BUNDLE_DIR = "bundle"
PRIVATE_SCHEME = "99CXRAI"  # private coding scheme for labels without a standard code
RESUME_OVERRIDES = frozenset(
    {"epochs", "max_steps", "patience", "device", "num_workers", "threads", "cache_dir",
     "disk_cache", "cache_memory_mb", "progress", "log_every"}
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What one fit run depends on whatever its task (saved in ``run_config.json``).

    Each task's configuration (a frozen dataclass inheriting this) sets the defaults of the
    fields left without one here and adds its own fields after these.
    """

    data: Path
    labels: Path
    out: Path
    task: str
    label_names: tuple[str, ...] = ()
    strict: bool = False
    modalities: tuple[str, ...] = ("CR", "DX")
    network: str
    network_args: dict[str, Any] = field(default_factory=dict)
    pretrained: Path | None = None
    image_size: int
    clahe: bool = False
    epochs: int
    max_steps: int = 0  # 0: no limit
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = -1  # -1: 5 % of all steps
    min_lr_ratio: float = 0.01
    optimizer: str = "adamw"  # or "adam" (CheXNet)
    schedule: str = "cosine"  # or "plateau": LR / 10 when the validation loss stalls
    clip_grad: float  # 0: off
    augment: bool = True
    patience: int  # 0: no early stopping
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
    name: str
    version: str = "0.1.0"
    description: str = ""
    progress: bool = True
    log_every: int = 10

    @staticmethod
    def check(checks: list[tuple[bool, str]]) -> None:
        """Raise :class:`FitError` with the message of the first failed check."""
        for ok, message in checks:
            if not ok:
                raise FitError(message)

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
        """Plain JSON; paths absolute, so ``--resume`` works from any working directory."""
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, Path):
                doc[key] = str(value.absolute())
            elif isinstance(value, tuple):
                doc[key] = list(value)
        return dict(doc)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        kinds = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in doc.items():
            if key not in kinds:
                continue  # written by a newer version: ignore, the rest still applies
            if "Path" in kinds[key] and value is not None:
                value = Path(value)
            elif "tuple" in kinds[key] and value is not None:
                value = tuple(value)
            values[key] = value
        return cls(**values)

    @classmethod
    def from_run(cls, run_dir: Path, overrides: dict[str, Any]) -> Self:
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
        config = cls.from_json({**saved, "out": str(run_dir)})
        current = config.to_json()
        changed = {k: v for k, v in overrides.items()
                   if k != "out" and current.get(k) != _jsonish(v)}  # fmt: skip
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


def saved_task(run_dir: Path) -> str:
    """The task of the run in ``run_dir`` (``classification`` when unknown)."""
    try:
        doc = json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))
        return str(doc["args"].get("task", "classification"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "classification"


# --------------------------------------------------------------------------------------------
# Records


def load_record(out: Path) -> dict[str, Any]:
    """``run_config.json`` of ``out`` ({} when there is none yet)."""
    try:
        return dict(json.loads((out / RUN_CONFIG).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


LABEL_ALIASES: dict[str, str] = {
    "effusion": "pleural_effusion",
    "infiltration": "infiltrate",
    "lung_opacity": "opacity",
}
"""ChestX-ray14 / torchxrayvision label names -> the node's code table names (ai.codes)."""


def label_code(name: str) -> CodedConcept:
    """The label's standard code, or a private-scheme one (logged) where it has none."""
    key = normalise_label(name)
    code = default_code(LABEL_ALIASES.get(key, key))
    if code is not None:
        return code
    logger.warning('Label "%s" has no standard code; using private scheme %s', name, PRIVATE_SCHEME)
    return CodedConcept(normalise_label(name).upper()[:16], PRIVATE_SCHEME, name)


def run_split(config: RunConfig, *, resume: bool, sops: list[str], matched: list[MatchedImage],
              label_names: Sequence[str]) -> PatientSplit:  # fmt: skip
    """The run's patient-level split: the saved one when resuming, ``--split-file``'s when
    given, else a new one of ``matched`` (one per image of ``sops``)."""
    source = config.run_dir if resume else config.split_file
    if source is not None:
        return PatientSplit.load(Path(source))
    return patient_split(sops, [m.patient_key for m in matched], [m.targets for m in matched],
                         fractions=config.split, seed=config.seed, label_names=label_names)  # fmt: skip


def make_loader(
    dataset: Dataset,
    sampler: torch.utils.data.Sampler,
    *,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool,
    seed: int,
    collate_fn: Callable[[Any], Any] | None = None,
) -> DataLoader:
    """A DataLoader whose own random draws come from ``seed`` (not the global RNG)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def steps_per_epoch(sampler: EpochSampler, batch_size: int) -> tuple[int, bool]:
    drop_last = len(sampler) > batch_size  # BatchNorm dislikes a last batch of one
    n = len(sampler) // batch_size if drop_last else math.ceil(len(sampler) / batch_size)
    return max(n, 1), drop_last


def improved(metric: float, best: float | None, monitor: str, min_delta: float) -> bool:
    """Whether ``metric`` beats ``best``; ``val_loss`` falls, the others rise, and
    ``last_epoch`` (nothing to measure on) always takes the latest epoch."""
    if monitor == "last_epoch":
        return True
    if not math.isfinite(metric):
        return best is None
    if best is None:
        return True
    return metric < best - min_delta if monitor == "val_loss" else metric > best + min_delta


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
    """What a finished run produced (``bundle_dir`` None on a non-zero torchrun rank)."""

    run_dir: Path
    bundle_dir: Path | None
    state: RunState
    monitor: str
    metrics: dict[str, Any]
    seconds: float


@dataclass
class Run:
    """The live objects of one run (per process) and the skeleton; tasks fill the hooks."""

    config: Any  # the task's RunConfig
    info: DistInfo
    device: torch.device
    data: Any  # the task's prepared data (``splits``: split name -> image indexes)
    model: nn.Module  # DDP-wrapped under torchrun
    cache: ImageCache
    monitor: str
    state: RunState = field(default_factory=RunState)
    resume: bool = False
    writer: Any = None

    command: ClassVar[str]  # recorded in run_config.json
    metrics_method: ClassVar[str]  # how metrics.json's figures were obtained
    find_unused_parameters: ClassVar[bool] = False  # DDP: a batch may leave a head unused
    checkpoint_tags: ClassVar[dict[str, Any]] = {}  # extra entries of last.pt

    # ---------------------------------------------------------------- task hooks

    @classmethod
    def check_labels(cls, config: Any) -> None:
        """Raise :class:`FitError` when ``--labels`` cannot be the task's label source."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, config: Any, *, resume: bool, progress: bool) -> tuple[Any, PatientSplit]:
        """Index, match and split (rank 0 only; the data is broadcast)."""
        raise NotImplementedError

    @classmethod
    def build_model(cls, config: Any, data: Any, resume: bool) -> tuple[nn.Module, dict | None]:
        """The seeded network and the ``--pretrained`` report (None: none loaded)."""
        raise NotImplementedError

    @classmethod
    def choose_monitor(cls, data: Any) -> str:
        """The validation figure that selects the best epoch."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[Any], Any] | None:
        return None

    def eval_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def train_parts(self) -> tuple[Dataset, EpochSampler]:
        """The (augmented) training dataset and this rank's epoch sampler."""
        raise NotImplementedError

    def train_epoch(self, opt: Optimisation, loader: DataLoader, budget: int,
                    bar: Any) -> dict[str, float]:  # fmt: skip
        """Up to ``budget`` optimiser steps (``state.step`` counted); the epoch record's
        training figures."""
        raise NotImplementedError

    def validate(self, opt: Optimisation) -> tuple[float, dict[str, Any]]:
        """The monitored value on the validation split and the epoch record's figures."""
        raise NotImplementedError

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Log an epoch record (main rank) and write its TensorBoard scalars."""
        raise NotImplementedError

    def predict(self, split: str) -> Any:
        """The model's output on every image of ``split``, in split order, on every rank."""
        raise NotImplementedError

    def score(self, predictions: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
        """Per-label thresholds (from validation) and ``per_label`` / ``summary`` figures."""
        raise NotImplementedError

    def write_predictions(self, predictions: dict[str, Any]) -> None:
        raise NotImplementedError

    def training_record(self) -> dict[str, Any]:
        """The task's entries in the bundle's ``training`` record."""
        raise NotImplementedError

    def metadata(self, labels: tuple[LabelSpec, ...], training: dict[str, Any],
                 metrics: dict[str, Any]) -> BundleMetadata:  # fmt: skip
        raise NotImplementedError

    # ---------------------------------------------------------------- shared parts

    @property
    def main(self) -> bool:
        return self.info.is_main

    def bar_label(self, text: str) -> str:
        """``text`` behind the configuration's ``progress_label`` (a detection field)."""
        return f"{getattr(self.config, 'progress_label', '')}{text}"

    def loader(self, dataset: Dataset, sampler: Any, *, drop_last: bool) -> DataLoader:
        config = self.config
        return make_loader(dataset, sampler, batch_size=config.batch_size,
                           num_workers=config.num_workers, drop_last=drop_last,
                           pin_memory=self.device.type == "cuda", seed=config.seed,
                           collate_fn=self.collate_fn())  # fmt: skip

    def eval_loader(self, split: str) -> DataLoader:
        """This rank's share of ``split`` in order (no augmentation)."""
        ds = self.eval_dataset(split)
        return self.loader(ds, ShardSampler(len(ds), self.info.world_size, self.info.rank),  # type: ignore[arg-type]
                           drop_last=False)  # fmt: skip

    def warm_cache(self) -> None:
        """Decode every image once (this rank's share), so a bad file stops the run up front
        with its SOP Instance UID instead of in the middle of an epoch."""
        mine = self.data.items[self.info.rank :: self.info.world_size]
        for item in tqdm(mine, desc=self.bar_label("preprocess"), unit="img",
                         disable=not (self.config.progress and self.main)):  # fmt: skip
            try:
                self.cache.get(item)
            except PixelDataError as exc:
                raise FitError(f"cannot preprocess an image: {exc}") from exc
        barrier(self.info)

    def train(self, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
        config = self.config
        train_ds, sampler = self.train_parts()
        per_epoch, drop_last = steps_per_epoch(sampler, config.batch_size)
        total = per_epoch * config.epochs
        total = min(total, config.max_steps) if config.max_steps else total
        warmup = config.warmup_steps if config.warmup_steps >= 0 else round(0.05 * total)
        opt = make_optimisation(self.model, self.device, lr=config.lr,
                                weight_decay=config.weight_decay, total_steps=total,
                                warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio,
                                amp=config.amp, clip_grad=config.clip_grad,
                                optimizer=config.optimizer, schedule=config.schedule)  # fmt: skip
        if self.resume:
            self.restore(opt)
        loader = self.loader(train_ds, sampler, drop_last=drop_last)
        if self.main:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only where used

            self.writer = SummaryWriter(str(config.run_dir / "tensorboard"),
                                        purge_step=self.state.step or None)  # fmt: skip
        logger.info("Training %s: %d images, %d steps per epoch, %d steps in all (monitor %s)",
                    config.task, len(train_ds), per_epoch, total, self.monitor)  # type: ignore[arg-type]  # fmt: skip
        state = self.state
        try:
            while state.epoch < config.epochs and state.step < total and not state.stopped_early:
                self.epoch(opt, sampler, loader, min(per_epoch, total - state.step))
                if on_epoch_end is not None:
                    on_epoch_end(dict(state.history[-1]))
        finally:
            if self.writer is not None:
                self.writer.close()

    def epoch(self, opt: Optimisation, sampler: EpochSampler, loader: DataLoader,
              budget: int) -> None:  # fmt: skip
        """One epoch: steps, validation, early stopping, record, checkpoints."""
        config, state = self.config, self.state
        sampler.set_epoch(state.epoch)
        t0 = time.perf_counter()
        bar = tqdm(total=budget, desc=self.bar_label(f"epoch {state.epoch + 1}/{config.epochs}"),
                   unit="step", disable=not (config.progress and self.main), leave=False)  # fmt: skip
        with bar:
            train_figures = self.train_epoch(opt, loader, budget, bar)
        metric, val_figures = self.validate(opt)
        if opt.plateau is not None and opt.plateau.update(float(val_figures.get("val_loss", math.nan))):
            logger.info("Validation loss plateaued: learning rate divided by 10")
        state.epoch += 1
        better = improved(metric, state.best_metric, self.monitor, config.min_delta)
        if better:
            state.best_metric = float(metric) if math.isfinite(metric) else None
            state.best_epoch, state.bad_epochs = state.epoch, 0
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(config.patience and state.bad_epochs >= config.patience)
        record = {"epoch": state.epoch, "step": state.step, **train_figures, **val_figures,
                  "lr": opt.optimizer.param_groups[0]["lr"], "improved": better,
                  "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        state.history.append(clean_json(record))
        self.log_epoch(record)
        if self.main:
            if better:
                checkpoint.save(config.run_dir / checkpoint.BEST,
                                {"model": unwrap(self.model).state_dict(), "epoch": state.epoch})  # fmt: skip
            self.save_last(opt)
        barrier(self.info)

    def save_last(self, opt: Optimisation) -> None:
        state = self.state
        checkpoint.save(self.config.run_dir / checkpoint.LAST, {
            "model": unwrap(self.model).state_dict(), **opt.state_dict(), "epoch": state.epoch,
            "step": state.step, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
            "monitor": self.monitor, "history": json.dumps(state.history),
            "rng": checkpoint.rng_state(), **self.checkpoint_tags,
        })  # fmt: skip

    def restore(self, opt: Optimisation) -> None:
        config = self.config
        payload = checkpoint.load(config.run_dir / checkpoint.LAST, map_location=self.device)
        try:
            unwrap(self.model).load_state_dict(payload["model"])
            opt.load_state_dict(payload)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FitError(f"{checkpoint.LAST} does not fit this run's model: {exc}") from exc
        self.state = RunState(
            epoch=int(payload["epoch"]), step=int(payload["step"]),
            best_metric=payload["best_metric"], best_epoch=int(payload["best_epoch"]),
            bad_epochs=int(payload["bad_epochs"]),
            stopped_early=bool(payload["stopped_early"]) and config.patience > 0
            and int(payload["bad_epochs"]) >= config.patience,
            history=json.loads(payload["history"]),
        )  # fmt: skip
        self.monitor = str(payload.get("monitor", self.monitor))
        checkpoint.set_rng_state(payload["rng"])
        logger.info("Resumed at epoch %d, step %d (best %s at epoch %d)", self.state.epoch,
                    self.state.step, self.state.best_metric, self.state.best_epoch)  # fmt: skip

    def finish(self, started: float) -> FitResult:
        """Score the best epoch; on rank 0 write metrics, predictions, bundle and record."""
        config, state = self.config, self.state
        barrier(self.info)
        best = config.run_dir / checkpoint.BEST
        if best.is_file():
            unwrap(self.model).load_state_dict(
                checkpoint.load(best, map_location=self.device)["model"]
            )
        predictions = {s: self.predict(s) for s in ("val", "test") if self.data.splits.get(s)}
        seconds = time.perf_counter() - started
        if not self.main:
            return FitResult(config.run_dir, None, state, self.monitor, {}, seconds)
        thresholds, figures = self.score(predictions)
        metrics = clean_json({
            "method": self.metrics_method, "best_epoch": state.best_epoch,
            "monitor": self.monitor, "best_metric": state.best_metric, **figures,
            "history": state.history,
        })  # fmt: skip
        write_json(config.run_dir / METRICS, metrics)
        self.write_predictions(predictions)
        bundle = self.write_bundle(thresholds, metrics, seconds)
        record = load_record(config.run_dir)
        record["results"] = clean_json({
            "finished": now(), "epochs_completed": state.epoch, "steps": state.step,
            "world_size": self.info.world_size, "device": str(self.device),
            "best_epoch": state.best_epoch, "monitor": self.monitor,
            "best_metric": state.best_metric, "stopped_early": state.stopped_early,
            "seconds_this_session": round(seconds, 1), "summary": metrics["summary"],
            "bundle": str(bundle),
        })  # fmt: skip
        write_json(config.run_dir / RUN_CONFIG, record)
        return FitResult(config.run_dir, bundle, state, self.monitor, metrics, seconds)

    def write_bundle(
        self, thresholds: list[float], metrics: dict[str, Any], seconds: float
    ) -> Path:
        config, state = self.config, self.state
        labels = tuple(LabelSpec(n, label_code(n), t)
                       for n, t in zip(self.data.label_names, thresholds, strict=True))  # fmt: skip
        training = {
            "run": config.run_dir.name, "seed": config.seed, "epochs_completed": state.epoch,
            "steps": state.step, "best_epoch": state.best_epoch, "monitor": self.monitor,
            **self.training_record(),
            "pretrained": bool(config.pretrained), "data": self.data.summary,
            "world_size": self.info.world_size, "device": self.device.type,
            "seconds_last_session": round(seconds, 1),
        }  # fmt: skip
        meta = self.metadata(labels, training, metrics)
        target = config.run_dir / BUNDLE_DIR
        try:
            save_bundle(target, meta, unwrap(self.model).cpu())
        except BundleError as exc:
            raise FitError(f"cannot write the bundle: {exc}") from exc
        finally:
            unwrap(self.model).to(self.device)
        items = {s: [self.data.items[i] for i in self.data.splits.get(s, [])]
                 for s in ("train", "val")}  # fmt: skip
        gate_run(target, items["train"], items["val"], self.cache.get, seed=config.seed)
        logger.info("Bundle written to %s", target)
        return target


# --------------------------------------------------------------------------------------------
# Driving a run


def run_fit(
    kind: type[Run],
    config: Any,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train (or continue, ``resume=True``) a run of the task ``kind``.

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
        _check_run_dir(kind, config, resume, info)
        prepared = _prepare_on_main(kind, config, resume) if info.is_main else None
        data = broadcast_object(prepared, info)
        run = _setup(kind, config, info, device, data, resume)
        run.train(on_epoch_end)
        result = run.finish(started)
        barrier(info)
        return result
    finally:
        shutdown(info)
        torch.set_num_threads(threads)


def _check_run_dir(kind: type[Run], config: Any, resume: bool, info: DistInfo) -> None:
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
    kind.check_labels(config)
    barrier(info)


def _prepare_on_main(kind: type[Run], config: Any, resume: bool) -> Any:
    out = config.run_dir
    out.mkdir(parents=True, exist_ok=True)
    data, split = kind.prepare(config, resume=resume, progress=config.progress)
    (out / DATA_REPORT).write_text(data.report + "\n", encoding="utf-8")
    if not resume:
        split.save(out)
    if not data.splits.get("train") or not data.splits.get("val"):
        raise FitError(f"the split leaves no training or no validation images: "
                       f"{data.summary['splits']}")  # fmt: skip
    record = load_record(out) if resume else {}
    record.update({"command": kind.command, "args": config.to_json(), "versions": versions(),
                   "git_commit": git_commit(), "data": data.summary})  # fmt: skip
    if resume:
        record.setdefault("resumes", []).append({"at": now()})
    else:
        record["started"] = now()
    write_json(out / RUN_CONFIG, clean_json(record))
    return data


def _setup(kind: type[Run], config: Any, info: DistInfo, device: torch.device, data: Any,
           resume: bool) -> Run:  # fmt: skip
    model, pretrained = kind.build_model(config, data, resume)
    model.to(device)
    cache_dir = config.cache_dir or (config.run_dir / "cache")
    cache = ImageCache(config.preprocess, cache_dir if config.disk_cache else None,
                       memory_bytes=config.cache_memory_mb << 20)  # fmt: skip
    wrapped = wrap(model, device, info, find_unused_parameters=kind.find_unused_parameters)
    run = kind(config, info, device, data, wrapped, cache, kind.choose_monitor(data),
               resume=resume)  # fmt: skip
    if pretrained is not None and info.is_main:
        record = load_record(config.run_dir)
        record["pretrained"] = pretrained
        write_json(config.run_dir / RUN_CONFIG, clean_json(record))
    run.warm_cache()
    return run
