"""Processes and devices of a fit run: one process or many under ``torchrun``, CPU or CUDA.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; then each process joins a
process group (NCCL on CUDA, gloo on CPU), wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and trains on its shard. Without those
variables the same code runs as a world of one, with no process group. Evaluation shards
the images over ranks and gathers the results (the task modules do), so every rank computes
the same metrics and takes the same early-stopping decision.

(Formerly the first part of ``training/loop.py``; the optimiser went to
:mod:`training.fit.optimisation`, the classification steps to
:mod:`training.fit.classification`.)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


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


def wrap(model: nn.Module, device: torch.device, info: DistInfo, *,
         find_unused_parameters: bool = False) -> nn.Module:  # fmt: skip
    """DDP under ``torchrun``, the bare model otherwise. ``find_unused_parameters`` is for
    models whose loss may skip a head in a batch (the detector on images without a box)."""
    if not info.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids,
                                   find_unused_parameters=find_unused_parameters)  # fmt: skip
