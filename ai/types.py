"""The narrow, typed interface between the DICOM service and the models.

``dicom_node`` hands :func:`ai.inference.Analyzer.analyze` pydicom datasets and gets back
:class:`ImageResult` objects: plain Python and NumPy, no tensors. Every coordinate in here
is in *source* pixel space of the analysed image: ``x`` = column, ``y`` = row, origin at the
top-left corner of the top-left pixel, so a box ``(0, 0, Columns, Rows)`` covers the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset


class AnalysisError(Exception):
    """The model side could not analyse an input (bad pixels, unsupported bundle, ...)."""


class BundleError(AnalysisError, ValueError):
    """A model bundle is missing, malformed or inconsistent."""


class ResourceExhaustedError(AnalysisError, MemoryError):
    """Not enough (device) memory even after retrying smaller and on the CPU: transient,
    the caller should retry later rather than give up on the input."""


class PixelDataError(AnalysisError, ValueError):
    """An image cannot be turned into model input (undecodable, too large, ...)."""


@dataclass(frozen=True)
class CodedConcept:
    """A code triplet as DICOM uses it (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a finding: the model bundle, as the SR device observer shows it."""

    name: str
    version: str
    device_uid: str
    task: str  # "classification" or "detection"
    manufacturer: str = "CXR AI node"
    demo: bool = False  # True for the phantom-trained demo bundles: never clinical
    ood_gate: bool = False  # the bundle carries an out-of-distribution gate (ai.bundle.gate)

    @property
    def display_name(self) -> str:
        suffix = " (DEMO, not for clinical use)" if self.demo else ""
        return f"{self.name} {self.version}{suffix}"


@dataclass(frozen=True)
class BoundingBox:
    """Axis-aligned box in source pixel coordinates (x = column, y = row), x0 < x1, y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"Degenerate box {self!r}: need x0 < x1 and y0 < y1")

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def polyline(self) -> list[tuple[float, float]]:
        """Closed 5-point polyline (column, row) as SR SCOORD and GSPS graphics need."""
        return [
            (self.x0, self.y0),
            (self.x1, self.y0),
            (self.x1, self.y1),
            (self.x0, self.y1),
            (self.x0, self.y0),
        ]


@dataclass(frozen=True)
class Finding:
    """One label's result on one image.

    ``probability`` is the model's calibrated score in [0, 1]; ``positive`` is
    ``probability >= threshold`` with the bundle's operating threshold. Classification
    findings carry no box unless Grad-CAM localised one; detection findings always do.
    """

    label: str
    concept: CodedConcept
    probability: float
    threshold: float
    positive: bool
    model: ModelIdentity
    box: BoundingBox | None = None


@dataclass(frozen=True)
class OodVerdict:
    """One gated model's out-of-distribution verdict on one image.

    ``score`` is the Mahalanobis distance of the image's pooled features from the model's
    training inputs; above ``threshold`` the image is outside the model's validated input
    range and the Analyzer withholds that model's findings for it (no findings at all).
    """

    model: ModelIdentity
    score: float
    threshold: float

    @property
    def out_of_distribution(self) -> bool:
        return self.score > self.threshold


@dataclass
class ImageResult:
    """Everything the models say about one source image.

    ``heatmap``: float32 array of shape (rows, columns) in [0, 1] at *source* resolution
    (the Grad-CAM of the positive findings, max-combined), or None when no finding is positive
    or no model produced one.

    ``display``: uint8 grey rendering of the source as the models saw it (modality LUT,
    VOI, MONOCHROME1 inversion; before letterboxing), so the overlay can be drawn without
    decoding the image a second time; None when not computed. Its shape is (rows, columns)
    or, for an image analysed at a reduced resolution level (a large image: see
    :func:`ai.pixels.display_level`), smaller with the same aspect ((rows, columns) /
    2**level, rounded up; the Analyzer's
    ``display_min_side`` bounds its short side from below). Contract for renderers: a
    source point (x, y) lands on display pixel (x * display.shape[1] / columns,
    y * display.shape[0] / rows); every coordinate in here stays in source pixels.

    ``finding_heatmaps``: each positive finding's own Grad-CAM (same shape and range as
    ``heatmap``), keyed by (model device UID, label), so a segmentation can give every
    finding its own segment; empty for findings without one (detector boxes), and empty
    unless the Analyzer was built with ``finding_maps=True`` (only the SEG reads them).

    ``ood``: one :class:`OodVerdict` per model that has a gate (models without one give
    none). A model whose verdict is out of distribution contributed no findings.
    """

    sop_instance_uid: str
    rows: int
    columns: int
    findings: list[Finding] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    models: list[ModelIdentity] = field(default_factory=list)
    display: np.ndarray | None = None
    finding_heatmaps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    ood: list[OodVerdict] = field(default_factory=list)

    @property
    def withheld(self) -> list[OodVerdict]:
        """The verdicts of the models whose findings were withheld (out of distribution)."""
        return [v for v in self.ood if v.out_of_distribution]

    @property
    def positive_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]

    @property
    def abnormal(self) -> bool:
        return any(f.positive for f in self.findings)


class Analyzer(Protocol):
    """What the node and ``training evaluate`` need from the model side: the one protocol,
    implemented by :class:`ai.inference.Analyzer` (and by the tests' fakes)."""

    @property
    def models(self) -> list[ModelIdentity]: ...

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]: ...
