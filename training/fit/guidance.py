"""Grad-CAM-guided fine-tuning (``training fit --gradcam-guidance WEIGHT``).

A phantom-trained classifier can score well while its Grad-CAM heatmap covers the whole
image (mediastinum, abdomen, letterbox padding): it found a shortcut, and a reader shown the
heatmap trusts it less. This option adds to the classification loss

    WEIGHT * mean over (image, positive label) of  E_out / E

where E is the energy (sum) of the label's Grad-CAM map on the model input and E_out its
part outside the *allowed region*: the lung mask of the image, plus the label's own boxes
in that image (the heart box of cardiomegaly lies outside the lungs; penalising the heart
for cardiomegaly would teach the model to ignore the finding). Both come from the
``locations.json`` sidecar that ``training synth`` writes beside ``labels.csv`` and
``training evaluate`` reads (:mod:`ai.reference.localisation`), mapped into the model input
through the node's letterbox.

The map is the node's Grad-CAM (:mod:`ai.gradcam`), kept differentiable:
``cam = relu(sum_c alpha_c A_c)`` with ``alpha = mean_hw(d logit_k / d A)`` from
``torch.autograd.grad(create_graph=True)`` on the activation ``A`` of the bundle's Grad-CAM
layer, upsampled bilinearly to the input size; the optimiser step then back-propagates
through the gradients themselves (double backprop), so both the weights that make ``A`` and
those that make ``alpha`` learn to keep the map inside the allowed region.

With the option off nothing here runs: the training step, the dataset and the loaders are
those of a plain fit. Training augmentation still applies: the allowed masks go through the
same random affine as their image (the intensity transforms touch the image only), so each
mask stays on its anatomy and the image is the one an unguided run with the same seed sees.

DistributedDataParallel does not support ``torch.autograd.grad``; the option is refused
under torchrun.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ai.networks import find_layer
from ai.pixels import Letterbox
from ai.reference.labels import normalise_path
from ai.reference.localisation import (
    ImageLocations,
    LocationsError,
    locations_beside,
    read_locations,
)
from training.datasets import ClassificationDataset, ImageCache, ImageItem
from training.errors import FitError
from training.images import is_image_file

EPSILON = 1e-6  # keeps an all-zero map's share at 0 instead of 0 / 0


# --------------------------------------------------------------------------------------------
# Allowed regions in model space


def sidecar_for(labels: Path) -> Path:
    """``locations.json`` beside ``labels``, or the :class:`FitError` the CLI prints."""
    sidecar = locations_beside(Path(labels))
    if sidecar is None:
        raise FitError(f'--gradcam-guidance needs lung masks: no locations.json beside --labels '
                       f'"{labels}" (training synth writes one)')  # fmt: skip
    return sidecar


def _source_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of the stored image, from its header only."""
    if is_image_file(path):  # PNG / JPEG: Pillow reads the size without decoding pixels
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError):
            raise FitError(f'cannot read the image size of "{path.name}"') from None
        return int(height), int(width)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


@dataclass(frozen=True)
class AllowedRegion:
    """One image's allowed regions in model space, kept small: the (S, S) lung mask and
    the labels' boxes as (label index, row0, row1, col0, col1) pixel ranges."""

    lungs: np.ndarray  # float16 (S, S), 0..1 (bilinear edges)
    boxes: tuple[tuple[int, int, int, int, int], ...]

    def masks(self, labels: int) -> np.ndarray:
        """(labels, S, S) float32: the lungs, plus each label's own boxes."""
        out = np.repeat(self.lungs.astype(np.float32)[None], labels, axis=0)
        for k, r0, r1, c0, c1 in self.boxes:
            out[k, r0:r1, c0:c1] = 1.0
        return out


def allowed_region(where: ImageLocations, box: Letterbox,
                   labels: Sequence[str]) -> AllowedRegion | None:  # fmt: skip
    """The allowed region of ``where`` in the model input ``box`` maps the image into, or
    None without a lung mask (a lateral view). The lung grid covers the whole image, so
    it is stretched onto the letterbox's content; boxes cover every pixel they touch."""
    if where.lungs is None:
        return None
    lungs = cv2.resize(where.lungs.astype(np.float32), (box.new_width, box.new_height),
                       interpolation=cv2.INTER_LINEAR)  # fmt: skip
    rects = []
    for k, label in enumerate(labels):
        for x0, y0, x1, y1 in where.regions(label):
            c0, c1 = box.offset_x + x0 * box.new_width, box.offset_x + x1 * box.new_width
            r0, r1 = box.offset_y + y0 * box.new_height, box.offset_y + y1 * box.new_height
            rects.append((k, int(r0), max(math.ceil(r1), int(r0) + 1),
                          int(c0), max(math.ceil(c1), int(c0) + 1)))  # fmt: skip
    return AllowedRegion(box.pad(np.clip(lungs, 0.0, 1.0)).astype(np.float16), tuple(rects))


def allowed_masks(where: ImageLocations, box: Letterbox,
                  labels: Sequence[str]) -> np.ndarray | None:  # fmt: skip
    """(labels, size, size) float32 allowed region per label in model space (lungs plus
    the label's boxes), or None without a lung mask (a lateral view)."""
    region = allowed_region(where, box, labels)
    return None if region is None else region.masks(len(labels))


def load_allowed(data_dir: Path, labels_csv: Path, items: Sequence[ImageItem],
                 labels: Sequence[str], size: int) -> dict[str, AllowedRegion]:  # fmt: skip
    """``{sop_instance_uid: allowed region}`` for the items with a lung mask in the sidecar
    (keyed, as ``training evaluate`` keys it, by the path relative to ``--data``)."""
    try:
        where = read_locations(sidecar_for(labels_csv))
    except LocationsError as exc:
        raise FitError(str(exc)) from exc
    root = Path(data_dir).resolve()
    out: dict[str, AllowedRegion] = {}
    for item in items:
        try:
            rel = normalise_path(Path(item.path).resolve().relative_to(root).as_posix())
        except ValueError:
            continue
        entry = where.get(rel)
        if entry is None or entry.lungs is None:
            continue
        rows, columns = _source_shape(Path(item.path))
        region = allowed_region(entry, Letterbox(rows, columns, size), labels)
        if region is not None:
            out[item.sop_instance_uid] = region
    return out


class GuidedDataset(ClassificationDataset):
    """:class:`ClassificationDataset` whose items also carry ``allowed`` (labels, S, S) and
    ``has_mask`` (0/1): the allowed regions, moved by the image's own random affine."""

    def __init__(self, items: Sequence[ImageItem], cache: ImageCache,
                 allowed: dict[str, AllowedRegion], *, augment: bool = False,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(items, cache, augment=augment, seed=seed)
        self.allowed = allowed
        self.labels = len(items[0].targets) if items else 0

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int | np.integer) else key
        item = self.items[int(index)]
        size = self.cache.params.size
        region = self.allowed.get(item.sop_instance_uid)
        masks = None if region is None else region.masks(self.labels)
        if self.transform is None or masks is None:
            out = super().__getitem__(key)
        else:  # the same draws as the plain dataset: affine on image + masks, the rest on image
            image = torch.from_numpy(self.cache.get(item).copy())
            seed = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)
            self.transform.set_random_state(seed=int(seed[0]))
            affine, *intensity = self.transform.transforms
            moved = _tensor(affine(torch.cat([image, torch.from_numpy(masks)])))
            image, moved_masks = moved[: len(image)], moved[len(image) :]
            for step in intensity:
                image = _tensor(step(image))
            out = {"image": image.float().clamp_(0.0, 1.0),
                   "target": torch.tensor(item.targets, dtype=torch.float32), "index": int(index)}  # fmt: skip
            masks = moved_masks.clamp(0.0, 1.0).numpy()
        has = masks is not None
        out["allowed"] = (torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)) if has
                          else torch.zeros((self.labels, size, size)))  # fmt: skip
        out["has_mask"] = torch.tensor(float(has))
        return out


def _tensor(value: Any) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


# --------------------------------------------------------------------------------------------
# The loss term


def outside_share(logits: torch.Tensor, activation: torch.Tensor, allowed: torch.Tensor,
                  pairs: torch.Tensor, *, create_graph: bool = True) -> torch.Tensor:  # fmt: skip
    """Per (image, label) pair where ``pairs`` (B, K) is true, the share of the label's
    Grad-CAM energy outside ``allowed`` (B, K, S, S): a 1-D tensor (pair order: by label,
    then image), differentiable through the gradients when ``create_graph``."""
    size = tuple(allowed.shape[-2:])
    shares: list[torch.Tensor] = []
    wanted = [k for k in range(pairs.shape[1]) if bool(pairs[:, k].any())]
    for n, k in enumerate(wanted):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), activation, create_graph=create_graph,
                                      retain_graph=create_graph or n < len(wanted) - 1)  # fmt: skip
        alpha = grad.float().mean((2, 3), keepdim=True)
        cam = F.relu((alpha * activation.float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        rows = pairs[:, k]
        cam = cam[rows]
        outside = (cam * (1.0 - allowed[rows, k])).flatten(1).sum(1)
        shares.append(outside / (cam.flatten(1).sum(1) + EPSILON))
    return torch.cat(shares) if shares else logits.new_zeros(0)


@dataclass
class Guidance:
    """The live part of the option: a forward hook that keeps the Grad-CAM layer's output
    (with its graph) and the running mean of the term for the epoch record."""

    weight: float
    layer: nn.Module
    _activation: torch.Tensor | None = None
    _sum: float = 0.0
    _count: int = 0

    @classmethod
    def attach(cls, model: nn.Module, layer_name: str, weight: float) -> Guidance:
        guidance = cls(weight, find_layer(model, layer_name))
        guidance.layer.register_forward_hook(guidance._hook)
        return guidance

    def _hook(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._activation = output if module.training and torch.is_grad_enabled() else None

    def term(self, logits: torch.Tensor, batch: dict[str, Any],
             device: torch.device) -> torch.Tensor:  # fmt: skip
        """WEIGHT * the mean outside share over the batch's positive pairs with a mask (0
        when there are none)."""
        activation, self._activation = self._activation, None
        if activation is None:
            raise RuntimeError("the Grad-CAM layer did not run in this training forward")
        has = batch["has_mask"].to(device) > 0
        pairs = (batch["target"].to(device) > 0.5) & has[:, None]
        if not bool(pairs.any()):
            return logits.new_zeros(())
        allowed = batch["allowed"].to(device, non_blocking=True)
        share = outside_share(logits, activation, allowed, pairs).mean()
        self._sum, self._count = self._sum + float(share.detach()), self._count + 1
        return self.weight * share

    def epoch_mean(self) -> float:
        """The mean outside share of the batches since the last call (NaN: none)."""
        mean = self._sum / self._count if self._count else math.nan
        self._sum, self._count = 0.0, 0
        return mean
