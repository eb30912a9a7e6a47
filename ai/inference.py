"""Run model bundles on DICOM datasets: the one entry point ``dicom_node`` calls.

:class:`Analyzer` loads bundles once, then :meth:`Analyzer.analyze` turns pydicom datasets
into :class:`~ai.types.ImageResult` objects (plain Python and NumPy, source pixel
coordinates). Several bundles run on the same images and their findings are merged. Each
image is decoded once per call whatever the number of bundles: the display image (one per
percentile window) is resized for each bundle's input size. An image much larger than every
model input and the overlay need is analysed at a reduced resolution level
(:func:`ai.pixels.display_level`: a JPEG 2000 decoded at that level, any other syntax shrunk
after its decode); the letterbox maps model coordinates back to source pixels all the same.

Classification bundles give one finding per label; a positive finding gets a Grad-CAM map
and a box around the map's largest hot region (>= half its peak), so viewers can show where.

Detection bundles (MONAI RetinaNet, :mod:`ai.detection`) give one finding per detected box:
the label and its code, the box score as ``probability``, the box mapped back to source
pixels through the letterbox, and ``positive = score >= the label's threshold``. Boxes
under the threshold but above the bundle's ``score_thresh`` (at most
``detections_per_img`` per image) are kept as non-positive findings: the SR lists them as
candidates with their certainty, GSPS and SC draw only the positive ones, and evaluation
needs them for AP and FROC. Boxes that fall wholly into the letterbox padding are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pydicom.dataset import Dataset

from ai.bundle.load import LoadedBundle, load_bundle
from ai.detection import Detections, detect
from ai.gradcam import GradCAM
from ai.ood import FeatureTap, verdicts, withheld_mask
from ai.pixels import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PERCENTILE_WINDOW,
    Letterbox,
    PreprocessParams,
    display_level,
    load_display_images,
    preprocess_image,
)
from ai.types import (
    AnalysisError,
    BundleError,
    Finding,
    ImageResult,
    ModelIdentity,
    OodVerdict,
    PixelDataError,
    ResourceExhaustedError,
)

logger = logging.getLogger(__name__)

CAM_BOX_THRESHOLD = 0.5
"""A positive finding's box encloses the largest region where its CAM >= this x its peak."""
DEFAULT_DISPLAY_MIN_SIDE = 1024
"""Short side (px) an image analysed at a reduced level keeps, so the SC overlay stays
readable (a 3000 x 2500 radiograph: 1500 x 1250)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise AnalysisError(f'device "{device}" is not a valid torch device') from exc


def cam_box(cam: np.ndarray, rel_threshold: float = CAM_BOX_THRESHOLD) -> tuple[int, ...] | None:
    """(x0, y0, x1, y1) pixel-edge box of the largest component of ``cam >= t * max``."""
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0.0:
        return None
    mask = (cam >= rel_threshold * peak).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[best, :4])
    return x, y, x + w, y + h


@dataclass
class _Prepared:
    """One image's model input for one set of preprocessing parameters."""

    tensor: np.ndarray  # (1, size, size) float32
    letterbox: Letterbox


@dataclass
class _ImageOutput:
    """What one bundle says about one image."""

    findings: list[Finding]
    heatmap: np.ndarray | None  # source resolution, or None
    # each positive finding's own map at source resolution, keyed by (device UID, label)
    finding_heatmaps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    ood: OodVerdict | None = None  # None: the bundle has no gate


class _Gated:
    """The out-of-distribution gate of one runner: features from the findings' own forward."""

    bundle: LoadedBundle

    def _open_gate(self) -> None:
        gate = self.bundle.gate
        self.tap = FeatureTap(self.bundle.model, gate.layer) if gate is not None else None

    def _verdicts(self, n: int) -> list[OodVerdict | None]:
        if self.tap is None or self.bundle.gate is None:
            return [None] * n
        return list(verdicts(self.bundle.gate, self.tap.take(), self.bundle.identity))


class _ClassificationRunner(_Gated):
    """One classification bundle on one device, batched, optionally with Grad-CAM.

    An image its gate finds out of distribution gets no findings and no Grad-CAM."""

    def __init__(
        self, bundle: LoadedBundle, device: torch.device, gradcam: bool, batch_size: int,
        finding_maps: bool = False,
    ) -> None:
        self.bundle = bundle
        self.meta = bundle.metadata
        self.device = device
        self.batch_size = batch_size
        self.finding_maps = finding_maps
        self.thresholds = np.asarray([label.threshold for label in self.meta.labels])
        self.cam = GradCAM(bundle.model, self.meta.target_layer) if gradcam else None
        self._open_gate()  # after Grad-CAM: its hook's output is what the tap pools
        self._lock = threading.Lock()  # hooks and CUDA streams: one batch at a time

    @property
    def identity(self) -> ModelIdentity:
        return self.bundle.identity

    def _probabilities(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.detach().float()
        probs = torch.sigmoid(logits) if self.meta.multi_label else torch.softmax(logits, 1)
        return probs.cpu().numpy()

    def _forward(self, batch: torch.Tensor) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
        """(probabilities, Grad-CAMs); the gate's verdicts go to ``self._found``."""
        if self.cam is None:
            with torch.inference_mode():
                probs = self._probabilities(self.bundle.model(batch))
            self._found = self._verdicts(batch.shape[0])
            return probs, {}
        logits, activation = self.cam.forward(batch)
        probs = self._probabilities(logits)
        self._found = self._verdicts(batch.shape[0])
        positive = (probs >= self.thresholds[None, :]) & ~withheld_mask(self._found)[:, None]
        if not positive.any():
            return probs, {}
        return probs, self.cam.maps(logits, activation, positive, batch.shape[2:])

    def run(self, prepared: Sequence[_Prepared]) -> list[_ImageOutput]:
        outputs: list[_ImageOutput] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            batch = torch.from_numpy(np.stack([p.tensor for p in chunk])).to(self.device)
            with self._lock:
                self._found: list[OodVerdict | None] = [None] * len(chunk)
                probs, cams = self._forward(batch)
                found = self._found
            for i, item in enumerate(chunk):
                verdict = found[i]
                if verdict is not None and verdict.out_of_distribution:
                    outputs.append(_ImageOutput([], None, ood=verdict))
                    continue
                image_cams = {k: cam for (b, k), cam in cams.items() if b == i}
                output = self._image_output(probs[i], image_cams, item.letterbox)
                output.ood = verdict
                outputs.append(output)
        return outputs

    def _image_output(
        self, probs: np.ndarray, cams: dict[int, np.ndarray], letterbox: Letterbox
    ) -> _ImageOutput:
        findings: list[Finding] = []
        for k, label in enumerate(self.meta.labels):
            box = None
            if k in cams:
                content = np.zeros_like(cams[k])
                letterbox.crop(content)[...] = letterbox.crop(cams[k])  # padding is not anatomy
                model_box = cam_box(content)
                box = letterbox.box_to_source(model_box) if model_box else None
            findings.append(
                Finding(
                    label=label.name,
                    concept=label.code,
                    probability=float(probs[k]),
                    threshold=label.threshold,
                    positive=bool(probs[k] >= label.threshold),
                    model=self.identity,
                    box=box,
                )
            )
        heatmap: np.ndarray | None = None
        own: dict[tuple[str, str], np.ndarray] = {}
        for k, cam in cams.items():  # max-combined as they come: one source-size map alive
            source = np.clip(letterbox.heatmap_to_source(cam), 0.0, 1.0).astype(
                np.float32, copy=False)
            if self.finding_maps:  # only the SEG needs each finding's own map
                own[(self.identity.device_uid, self.meta.labels[k].name)] = source
            if heatmap is None:
                heatmap = source.copy() if self.finding_maps else source
            else:
                np.maximum(heatmap, source, out=heatmap)
        return _ImageOutput(findings, heatmap, own)


class _DetectionRunner(_Gated):
    """One RetinaNet bundle on one device: boxes become findings in source pixels; an
    image its gate finds out of distribution gets none."""

    def __init__(self, bundle: LoadedBundle, device: torch.device, batch_size: int) -> None:
        self.bundle = bundle
        self.meta = bundle.metadata
        self.device = device
        self.batch_size = batch_size
        self._open_gate()
        self._lock = threading.Lock()  # the detector caches anchors: one batch at a time

    @property
    def identity(self) -> ModelIdentity:
        return self.bundle.identity

    def run(self, prepared: Sequence[_Prepared]) -> list[_ImageOutput]:
        outputs: list[_ImageOutput] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            batch = torch.from_numpy(np.stack([p.tensor for p in chunk])).to(self.device)
            with self._lock:
                found = detect(self.bundle.model, batch)  # type: ignore[arg-type]
                gated = self._verdicts(len(chunk))
            outputs.extend(
                _ImageOutput([] if verdict is not None and verdict.out_of_distribution
                             else self._findings(dets, item.letterbox), None, ood=verdict)
                for dets, item, verdict in zip(found, chunk, gated, strict=True)
            )
        return outputs

    def _findings(self, dets: Detections, letterbox: Letterbox) -> list[Finding]:
        findings: list[Finding] = []
        for box, score, k in zip(dets.boxes, dets.scores, dets.labels, strict=True):
            if not 0 <= int(k) < len(self.meta.labels):
                continue
            source = letterbox.box_to_source([float(v) for v in box])
            if source is None:  # all in the padding: not on the image
                continue
            label = self.meta.labels[int(k)]
            findings.append(
                Finding(
                    label=label.name,
                    concept=label.code,
                    probability=float(score),
                    threshold=label.threshold,
                    positive=bool(score >= label.threshold),
                    model=self.identity,
                    box=source,
                )
            )
        return findings


def _make_runner(
    bundle: LoadedBundle, device: torch.device, gradcam: bool, batch_size: int,
    finding_maps: bool = False,
) -> _ClassificationRunner | _DetectionRunner:
    task = bundle.metadata.task
    if task == "classification":
        return _ClassificationRunner(bundle, device, gradcam, batch_size, finding_maps)
    if task == "detection":
        return _DetectionRunner(bundle, device, batch_size)
    raise BundleError(f'Bundle "{bundle.metadata.name}": task "{task}" has no runner')


class Analyzer:
    """Loads model bundles once and analyses chest radiographs with all of them.

    Args:
        bundle_dirs: bundle directories (MONAI layout), run in this order.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        gradcam: compute Grad-CAM maps and boxes for positive findings.
        max_pixels: refuse images with more samples than this (before decoding).
        batch_size: images per forward pass.
        display_min_side: an image is analysed at a reduced level (a JPEG 2000 decoded
            smaller, any other image shrunk after decoding) only as far as its short side
            keeps this many pixels, because the reduced image is also
            ``ImageResult.display``, the overlay's background (0: as small as the models
            allow; None: never reduced, the overlay at the source's size). The models always
            get at least twice their input size.
        finding_maps: keep each positive finding's own source-size Grad-CAM in
            ``ImageResult.finding_heatmaps`` (only the SEG output reads them; 16 MB each at
            2000 x 2000). The combined ``heatmap`` is made either way.
    """

    def __init__(
        self,
        bundle_dirs: Sequence[Path],
        *,
        device: str = "auto",
        gradcam: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        display_min_side: int | None = DEFAULT_DISPLAY_MIN_SIDE,
        finding_maps: bool = False,
    ) -> None:
        if not bundle_dirs:
            raise BundleError("Analyzer needs at least one bundle directory")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if display_min_side is not None and display_min_side < 0:
            raise ValueError(f"display_min_side must be >= 0, got {display_min_side}")
        self.device = resolve_device(device)
        self.max_pixels = max_pixels
        self.display_min_side = display_min_side
        self._bundle_dirs = [Path(d) for d in bundle_dirs]
        self._gradcam, self._batch_size = gradcam, batch_size
        self._finding_maps = finding_maps
        self._runners = [
            _make_runner(load_bundle(d, device=self.device), self.device, gradcam, batch_size,
                         finding_maps)
            for d in self._bundle_dirs
        ]
        self._params = [r.meta.input.preprocess_params(max_pixels) for r in self._runners]
        self._cpu_runners: dict[int, _ClassificationRunner | _DetectionRunner] = {}
        uids = [r.identity.device_uid for r in self._runners]
        if len(set(uids)) != len(uids):
            raise BundleError(f"Two bundles share a device UID: {uids}")

    @property
    def models(self) -> list[ModelIdentity]:
        return [runner.identity for runner in self._runners]

    def reduce_level(self, ds: Dataset) -> int:
        """The resolution level ``ds`` is analysed at (:func:`ai.pixels.display_level`):
        its short side stays >= twice the largest model input and >= ``display_min_side``
        (0 when that is None)."""
        if self.display_min_side is None:
            return 0
        need = max(2 * max(p.size for p in self._params), self.display_min_side)
        return display_level(ds, need)

    def _prepare_image(self, ds: Dataset, result: ImageResult) -> dict[PreprocessParams, _Prepared]:
        """Decode ``ds`` once; one display image per window; one model input per params."""
        try:
            displays = load_display_images(
                ds, [p.percentile_window for p in self._params], max_pixels=self.max_pixels,
                reduce=self.reduce_level(ds))
            source = (result.rows, result.columns)
            prepared = {}
            for params in dict.fromkeys(self._params):
                tensor, letterbox = preprocess_image(
                    displays[params.percentile_window], params, source)
                prepared[params] = _Prepared(tensor, letterbox)
        except PixelDataError as exc:
            uid = ds.get("SOPInstanceUID", "unknown")
            raise PixelDataError(f"SOP Instance {uid}: {exc}") from exc
        image = displays.get(DEFAULT_PERCENTILE_WINDOW)
        if image is not None:
            result.display = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return prepared

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """One :class:`ImageResult` per dataset, in order; every coordinate in source pixels.

        Raises:
            PixelDataError: an image cannot be decoded or is too large (names its UID).
        """
        started = time.perf_counter()
        results = [
            ImageResult(
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                rows=int(ds.get("Rows", 0) or 0),
                columns=int(ds.get("Columns", 0) or 0),
                models=self.models,
            )
            for ds in datasets
        ]
        per_image = [self._prepare_image(ds, r) for ds, r in zip(datasets, results, strict=True)]
        for index, (runner, params) in enumerate(zip(self._runners, self._params, strict=True)):
            outputs = self._run_guarded(index, runner, [p[params] for p in per_image])
            for result, output in zip(results, outputs, strict=True):
                _merge(result, output)
        logger.debug(
            "Analysed %d image(s) with %d bundle(s) in %.0f ms",
            len(results), len(self._runners), 1000 * (time.perf_counter() - started),
        )  # fmt: skip
        return results

    def _run_guarded(self, index: int, runner: _ClassificationRunner | _DetectionRunner,
                     prepared: list[_Prepared]) -> list[_ImageOutput]:
        """Out of device memory: retry one image at a time, then on the CPU, then give up
        with a transient error (the node retries the job later and keeps receiving)."""
        try:
            return runner.run(prepared)
        except torch.OutOfMemoryError:
            _release_device_memory()
            logger.warning("Out of device memory with %d image(s): one at a time",
                           len(prepared))
        try:
            return [out for p in prepared for out in runner.run([p])]
        except torch.OutOfMemoryError as exc:
            _release_device_memory()
            if self.device.type == "cpu":
                raise ResourceExhaustedError(f"out of memory on the CPU: {exc}") from exc
        logger.warning("Out of device memory on %s: this call runs on the CPU", self.device)
        if index not in self._cpu_runners:
            cpu = torch.device("cpu")
            self._cpu_runners[index] = _make_runner(
                load_bundle(self._bundle_dirs[index], device=cpu), cpu, self._gradcam,
                self._batch_size, self._finding_maps)
        try:
            return self._cpu_runners[index].run(prepared)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise ResourceExhaustedError(f"out of memory on {self.device} and CPU") from exc


def _release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merge(result: ImageResult, output: _ImageOutput) -> None:
    result.findings.extend(output.findings)
    result.finding_heatmaps.update(output.finding_heatmaps)
    if output.ood is not None:
        result.ood.append(output.ood)
    if output.heatmap is None:
        return
    if result.heatmap is None:
        result.heatmap = output.heatmap.astype(np.float32, copy=False)
    else:
        np.maximum(result.heatmap, output.heatmap, out=result.heatmap)
