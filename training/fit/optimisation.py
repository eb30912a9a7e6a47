"""Optimisation of a fit run, the same for every task.

* AdamW with a linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, stepped
  per optimiser step; no weight decay on biases and norm weights.
* Or, for CheXNet's recipe (``--optimizer adam --schedule plateau``): Adam (betas 0.9,
  0.999) and the learning rate divided by 10 whenever the validation loss stops falling
  (:class:`PlateauFactor`, checked after each epoch; the warm-up still applies).
* AMP on CUDA (``torch.autocast`` float16 + ``GradScaler``); on CPU both are disabled and
  cost nothing. Gradients are clipped by global norm (after unscaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "plateau")


class PlateauFactor:
    """LR multiplier per step: the warm-up, times ``factor`` for every plateau of the
    validation loss (no improvement for ``patience`` epochs). A callable object, so
    ``LambdaLR.state_dict`` saves its counters and a resumed run keeps its reduced LR."""

    def __init__(self, warmup_steps: int, factor: float = 0.1, patience: int = 1) -> None:
        self.warmup_steps, self.factor, self.patience = int(warmup_steps), factor, patience
        self.scale, self.best, self.bad_epochs, self.reductions = 1.0, math.inf, 0, 0

    def __call__(self, step: int) -> float:
        warm = (step + 1) / (self.warmup_steps + 1) if step < self.warmup_steps else 1.0
        return warm * self.scale

    def update(self, val_loss: float) -> bool:
        """Record an epoch's validation loss; True when the LR was just reduced."""
        if not math.isfinite(val_loss):
            return False
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return False
        self.scale *= self.factor
        self.bad_epochs, self.reductions = 0, self.reductions + 1
        return True


@dataclass
class Optimisation:
    """Optimiser, per-step scheduler and AMP scaler of one run."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    clip_grad: float
    plateau: PlateauFactor | None = None

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
    optimizer: str = "adamw",
    schedule: str = "cosine",
) -> Optimisation:
    """AdamW or Adam (no weight decay on biases and norm weights) + warm-up/cosine or
    warm-up/plateau + GradScaler."""
    if optimizer not in OPTIMIZERS or schedule not in SCHEDULES:
        raise ValueError(f'optimizer "{optimizer}" / schedule "{schedule}" must be one of '
                         f"{OPTIMIZERS} / {SCHEDULES}")  # fmt: skip
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = kind(groups, lr=lr, betas=(0.9, 0.999))
    plateau = PlateauFactor(warmup_steps) if schedule == "plateau" else None
    factor = plateau or warmup_cosine(total_steps, warmup_steps, min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    use_amp = bool(amp and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    return Optimisation(opt, scheduler, scaler, use_amp, clip_grad, plateau)


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
