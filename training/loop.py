"""The training engine: one process or many under ``torchrun``, CPU or CUDA.

* Distributed: ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; then each
  process joins a process group (NCCL on CUDA, gloo on CPU), wraps the model in
  :class:`~torch.nn.parallel.DistributedDataParallel` and trains on its shard. Without
  those variables the same code runs as a world of one, with no process group.
* AMP on CUDA (``torch.autocast`` float16 + ``GradScaler``); on CPU both are disabled and
  cost nothing.
* AdamW with a linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, stepped
  per optimiser step; gradients clipped by global norm (after unscaling).
* Evaluation shards the images over ranks and gathers the probabilities, so every rank
  computes the same metrics and takes the same early-stopping decision.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ai.reference.metrics import auroc, auroc_estimate, binary_metrics_at, youden_threshold

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: world size 1 without ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    logger.info("Distributed: rank %d of %d (local %d)", rank, world, local_rank)
    return DistInfo(rank, world, local_rank)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU under torchrun) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f'device "{name}" requested but CUDA is not available')
        if info.distributed or device.index is None:
            device = torch.device("cuda", info.local_rank if info.distributed else 0)
        torch.cuda.set_device(device)
    return device


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# --------------------------------------------------------------------------------------------
# Optimisation


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.01):  # type: ignore[no-untyped-def]
    """LR multiplier per step: linear 1/w .. 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    total = max(1, int(total_steps))
    warm = max(0, min(int(warmup_steps), total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Optimisation:
    """Optimiser, per-step scheduler and AMP scaler of one run."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    clip_grad: float

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def make_optimisation(
    model: nn.Module,
    device: torch.device,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    amp: bool,
    clip_grad: float,
) -> Optimisation:
    """AdamW (no weight decay on biases and norm weights) + warm-up/cosine + GradScaler."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, min_lr_ratio)
    )
    use_amp = bool(amp and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    return Optimisation(optimizer, scheduler, scaler, use_amp, clip_grad)


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
) -> tuple[int, float]:
    """Train until ``loader`` ends or ``max_steps`` steps were taken in this call.

    Returns (steps taken, mean training loss). ``on_step(loss, lr)`` runs after each step.
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
        optimizer_step(opt, model, loss)
        value = float(loss.detach())
        steps, total = steps + 1, total + value
        if on_step is not None:
            on_step(value, opt.optimizer.param_groups[0]["lr"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}")
    return steps, total / max(steps, 1)


# --------------------------------------------------------------------------------------------
# Evaluation


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


def make_loader(
    dataset: torch.utils.data.Dataset,
    sampler: torch.utils.data.Sampler,
    *,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool,
    seed: int,
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
        generator=torch.Generator().manual_seed(seed),
    )


def optimizer_step(opt: Any, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One scaled (AMP) optimiser step with gradient clipping and the LR schedule; shared by
    the classification and detection trainers. A non-finite loss stops the run."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()} (lower the LR?)")
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if opt.clip_grad > 0:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
