"""Does a classifier look where the finding is? Grad-CAM localisation against known regions.

Two figures per label, on true-positive images (the finding is present and the model called
it), as in the weakly-supervised localisation literature:

* **pointing game** (Zhang et al., 2016/2018): a hit when the heatmap's maximum lies inside
  the finding's region, or within a small tolerance of it. The tolerance is stated in
  pixels of the model input (:data:`TOLERANCE_MODEL_PX` at the model's input size, 15 px at
  224 as in the literature) and converted to the map's own resolution, so the same figure
  comes out whether the map is measured in the 224 px letterbox or at source resolution.
* **energy in the lungs**: the fraction of the heatmap's total mass inside the lung mask.
  A heatmap that covers the whole image (mediastinum, abdomen, labels, padding) scores low.

Reference regions come from a *locations* sidecar (``locations.json`` beside a labels CSV;
:mod:`training.synth` writes one for its phantoms): per image, the findings' boxes in
normalised image coordinates and a coarse lung mask (packed bits on a square grid over the
image). Both ``training evaluate`` and the node's evaluation jobs read it here, so they
report the same figures for the same set.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ai.codes import normalise_label
from ai.reference.labels import normalise_path
from ai.reference.metrics import Estimate, wilson_interval
from ai.types import AnalysisError, ImageResult

LOCATIONS_FORMAT = "cxr-locations/1"
LOCATIONS_FILE = "locations.json"
TOLERANCE_MODEL_PX = 15.0  # pointing-game tolerance in pixels of a 224 px model input
TOLERANCE_INPUT_SIZE = 224
LUNG_GRID = 64  # side of the square grid the lung mask is stored on

NormBox = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in normalised image coordinates (0..1, x = column)."""


class LocationsError(AnalysisError, ValueError):
    """A locations sidecar that cannot be used (unreadable, wrong format, bad box)."""


# --------------------------------------------------------------------------------------------
# The two measures, on one heatmap


def pointing_hit(heatmap: np.ndarray, boxes: Sequence[NormBox], tolerance_px: float) -> bool:
    """True when the heatmap's maximum is inside one of ``boxes`` or within ``tolerance_px``
    pixels (of the heatmap) of one. The maximum is the first arg-max (row-major); an all-zero
    map points nowhere and is a miss."""
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heat.shape}")
    if not boxes or not np.isfinite(heat).all() or heat.max() <= 0:
        return False
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = heat.shape
    x, y = col + 0.5, row + 0.5  # the pixel's centre, in pixel-edge coordinates
    for x0, y0, x1, y1 in boxes:
        dx = max(x0 * cols - x, 0.0, x - x1 * cols)
        dy = max(y0 * rows - y, 0.0, y - y1 * rows)
        if math.hypot(dx, dy) <= tolerance_px:
            return True
    return False


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the (non-negative) heatmap mass where ``mask`` is true; NaN for an
    all-zero map. ``mask`` is resampled (nearest) to the heatmap's shape when it differs."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heat.shape}")
    inside = resample_mask(mask, heat.shape)
    total = float(heat.sum())
    if total <= 0 or not math.isfinite(total):
        return float("nan")
    return float(heat[inside].sum() / total)


def resample_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as a boolean array of ``shape`` (rows, columns), nearest-neighbour."""
    m = np.asarray(mask).astype(bool)
    if m.shape == tuple(shape):
        return m
    resized = cv2.resize(m.astype(np.uint8), (int(shape[1]), int(shape[0])),
                         interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def tolerance_for(shape: tuple[int, ...], input_size: int = TOLERANCE_INPUT_SIZE) -> float:
    """The pointing tolerance in pixels of a map of ``shape`` covering the whole image: the
    model-input tolerance scaled by (the map's long side / the model's input size), since the
    letterbox maps the image's long side onto the input size."""
    return TOLERANCE_MODEL_PX * max(shape[0], shape[1]) / input_size


# --------------------------------------------------------------------------------------------
# Per-label summary


@dataclass
class LocalisationTally:
    """Running counts of one label's true-positive images."""

    hits: int = 0
    images: int = 0
    energies: list[float] = field(default_factory=list)

    def add(self, hit: bool, energy: float | None) -> None:
        self.images += 1
        self.hits += int(hit)
        if energy is not None and math.isfinite(energy):
            self.energies.append(float(energy))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``hit_rate`` (with a Wilson 95% CI), ``lung_energy`` (mean, None when
        no lung mask was known), the counts and the tolerance used."""
        rate: Estimate = wilson_interval(self.hits, self.images)
        return {
            "tp_images": self.images,
            "hits": self.hits,
            "hit_rate": rate.as_dict() if self.images else None,
            "lung_energy": float(np.mean(self.energies)) if self.energies else None,
            "tolerance_model_px": TOLERANCE_MODEL_PX,
        }


def summarise(tallies: Mapping[str, LocalisationTally]) -> dict[str, dict[str, Any]]:
    """``{label: tally.as_dict()}`` for the labels that had a true-positive image."""
    return {label: t.as_dict() for label, t in tallies.items() if t.images}


# --------------------------------------------------------------------------------------------
# The sidecar: boxes and lung masks per image


@dataclass(frozen=True)
class ImageLocations:
    """Where one image's findings are, and its lungs (None when unknown)."""

    boxes: tuple[tuple[str, NormBox], ...]  # (normalised label, box)
    lungs: np.ndarray | None = None  # bool (LUNG_GRID, LUNG_GRID) over the whole image

    def regions(self, label: str) -> list[NormBox]:
        key = normalise_label(label)
        return [box for name, box in self.boxes if name == key]


def pack_mask(mask: np.ndarray) -> str:
    """A boolean mask as base64 packed bits on the :data:`LUNG_GRID` square grid."""
    grid = resample_mask(mask, (LUNG_GRID, LUNG_GRID))
    return base64.b64encode(np.packbits(grid.ravel()).tobytes()).decode("ascii")


def unpack_mask(text: str) -> np.ndarray:
    """Inverse of :func:`pack_mask`."""
    try:
        bits = np.unpackbits(np.frombuffer(base64.b64decode(text, validate=True), np.uint8))
    except ValueError as exc:
        raise LocationsError(f"lung mask is not base64 ({exc})") from exc
    if bits.size < LUNG_GRID * LUNG_GRID:
        raise LocationsError(f"lung mask has {bits.size} bits, expected {LUNG_GRID ** 2}")
    return bits[: LUNG_GRID * LUNG_GRID].reshape(LUNG_GRID, LUNG_GRID).astype(bool)


def image_entry(boxes: Iterable[tuple[str, NormBox]], lungs: np.ndarray | None) -> dict[str, Any]:
    """One image's JSON entry for :func:`write_locations`."""
    return {
        "boxes": [[name, *(round(float(v), 6) for v in box)] for name, box in boxes],
        "lungs": None if lungs is None else pack_mask(lungs),
    }


def write_locations(path: Path, entries: Mapping[str, dict[str, Any]]) -> Path:
    """Write the sidecar: ``entries`` maps the image's path relative to the data folder to
    :func:`image_entry`."""
    doc = {"format": LOCATIONS_FORMAT, "grid": LUNG_GRID, "images": dict(sorted(entries.items()))}
    Path(path).write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    return Path(path)


def _box(item: Any, where: str) -> tuple[str, NormBox]:
    if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str)):
        raise LocationsError(f"{where}: a box is [label, x0, y0, x1, y1], got {item!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in item[1:])
    except (TypeError, ValueError) as exc:
        raise LocationsError(f"{where}: box {item!r} has a non-numeric coordinate") from exc
    if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
        raise LocationsError(f"{where}: box {item!r} is not inside 0..1 with x0<=x1, y0<=y1")
    return normalise_label(item[0]), (x0, y0, x1, y1)


def read_locations(path: Path) -> dict[str, ImageLocations]:
    """The sidecar as ``{normalised relative path: ImageLocations}``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LocationsError(f'locations "{path}": not readable JSON ({exc})') from exc
    if not isinstance(doc, dict) or doc.get("format") != LOCATIONS_FORMAT:
        raise LocationsError(f'locations "{path}": expected "format": "{LOCATIONS_FORMAT}"')
    if doc.get("grid") != LUNG_GRID or not isinstance(doc.get("images"), dict):
        raise LocationsError(f'locations "{path}": expected "grid": {LUNG_GRID} and "images"')
    out: dict[str, ImageLocations] = {}
    for rel, entry in doc["images"].items():
        where = f'locations "{Path(path).name}", image "{rel}"'
        if not isinstance(entry, dict):
            raise LocationsError(f"{where}: expected an object with boxes and lungs")
        boxes = tuple(_box(item, where) for item in entry.get("boxes") or [])
        lungs = entry.get("lungs")
        out[normalise_path(rel)] = ImageLocations(boxes, unpack_mask(lungs) if lungs else None)
    return out


def locations_beside(labels_csv: Path) -> Path | None:
    """The sidecar next to a labels CSV, if there is one."""
    candidate = Path(labels_csv).parent / LOCATIONS_FILE
    return candidate if candidate.is_file() else None


def measure(heatmap: np.ndarray, where: ImageLocations, label: str,
            tolerance_px: float | None = None) -> tuple[bool, float | None] | None:
    """(pointing hit, energy in the lungs or None) of one map covering the whole image, or
    None when the label has no region in this image (nothing to point at)."""
    regions = where.regions(label)
    if not regions:
        return None
    tol = tolerance_for(heatmap.shape) if tolerance_px is None else tolerance_px
    energy = None if where.lungs is None else energy_inside(heatmap, where.lungs)
    return pointing_hit(heatmap, regions, tol), energy


class LocalisationCollector:
    """Tallies per (model device UID, label) from the node's :class:`ai.types.ImageResult`
    (``finding_heatmaps`` at source resolution): the true positives of classification
    models, i.e. a positive finding whose reference truth is 1 and whose image has a region
    for it. ``training evaluate`` and the node's evaluation jobs both feed results here.

    Without per-finding maps (the node makes them only when its SEG output is on) the
    combined ``heatmap`` is used where it is exactly one finding's map: on images with a
    single positive classification finding; other images are then not counted."""

    def __init__(self) -> None:
        self.tallies: dict[tuple[str, str], LocalisationTally] = {}

    def add(self, result: ImageResult, where: ImageLocations | None,
            truth: Callable[[str], int | None]) -> None:
        """Measure every true-positive finding of ``result`` that has its own heatmap."""
        if where is None:
            return
        positives = [f for f in result.findings
                     if f.positive and f.model.task == "classification"]
        only = result.heatmap if len(positives) == 1 else None
        for finding in positives:
            model = finding.model
            heat = result.finding_heatmaps.get((model.device_uid, finding.label), only)
            if heat is None or truth(finding.label) != 1:
                continue
            found = measure(heat, where, finding.label)
            if found is not None:
                key = (model.device_uid, finding.label)
                self.tallies.setdefault(key, LocalisationTally()).add(*found)

    def figures(self, device_uid: str) -> dict[str, dict[str, Any]]:
        """``{label: LocalisationTally.as_dict()}`` of one model."""
        return summarise({label: t for (uid, label), t in self.tallies.items()
                          if uid == device_uid})
