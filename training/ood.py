"""Fitting a bundle's out-of-distribution gate (:mod:`ai.bundle.gate`) on its own inputs.

The features are those the node computes (:class:`ai.ood.FeatureTap` on the bundle's
network, the images read through :func:`ai.pixels.preprocess`, the node's own path). The
*fit* images give the mean and a Ledoit-Wolf shrunk covariance (the feature dimension is
often close to the number of images, where a plain covariance is singular); the threshold
is the ``quantile`` of the Mahalanobis scores of the *validation* images, never of the fit
images, which sit closer to their own mean than any new image does.

Used by the demo builds (:func:`gate_on_phantoms`), ``training fit`` (the run's train and
val splits), ``training import-weights --ood-images`` and ``training ood-gate``
(:func:`gate_bundle`: refit a bundle on the user's own images).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import torch

from ai.bundle.gate import DEFAULT_QUANTILE, QUANTILE_RANGE, OodGate
from ai.bundle.load import LoadedBundle, load_bundle, save_bundle
from ai.detection import detect
from ai.ood import FeatureTap, feature_layer
from ai.pixels import preprocess
from training.errors import TrainingError
from training.images import is_image_file, load_image_file

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEMO_GATE_STUDIES = {True: 150, False: 400}
"""Phantom studies a demo build fits its gate on (quick, full): 40 % of their frontal
images set the threshold, so the quantile is not read off a handful of scores."""
RUN_FIT_CAP = 2000
"""At most this many images of a split go into the gate (enough for D = 1024)."""
MIN_IMAGES = 4
"""Fewer fit or validation images than this cannot give a meaningful gate."""
RANDOM_SIDE_MIN = 320
"""The smallest long side of a random gate size: no radiograph is smaller; the build's own
(smaller) training size is in the gate's sizes anyway."""
RANDOM_SIDE_MAX = {True: 1024, False: 3072}
"""The largest long side of a random gate size (quick, full): a full build's gate must pass
detector plates (up to 3000 x 3000; capped at 2048 px its detector gate passed 37 of 40
held-out plate-size phantoms)."""
RANDOM_SIZES = {True: 46, False: 95}
"""Random image sizes of :func:`phantom_sizes` (quick, full): with :data:`DEMO_GATE_STUDIES`
about three and four phantom studies per size."""


class OodFitError(TrainingError, ValueError):
    """The gate cannot be fitted as asked (too few images, bad quantile, unreadable files)."""


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, shrunk covariance, shrinkage) of the rows of ``x`` (Ledoit and Wolf, 2004):
    ``(1 - a) S + a mu I`` with ``mu = trace(S) / D`` and the ``a`` that minimises the
    expected squared error, so the result is invertible whatever N and D."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    sample = xc.T @ xc / n
    mu = float(np.trace(sample)) / d
    delta = float(((sample - mu * np.eye(d)) ** 2).sum()) / d
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - 2 sum_k x_k^T S x_k + n ||S||^2
    norms = (xc**2).sum(1)
    spread = (norms**2).sum() - 2 * np.einsum("ki,ij,kj->", xc, sample, xc) \
        + n * (sample**2).sum()
    beta = float(spread) / (n * n * d)
    shrinkage = 1.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    floor = max(mu, 1e-12) * 1e-6  # constant features: keep the covariance invertible
    cov = (1 - shrinkage) * sample + (shrinkage * mu + floor) * np.eye(d)
    return mean, cov, shrinkage


def features(loaded: LoadedBundle, tensors: np.ndarray, layer: str, batch_size: int = 16) -> np.ndarray:
    """(N, D) pooled features of the (N, C, S, S) model inputs, as the node computes them."""
    tap = FeatureTap(loaded.model, layer)
    out: list[np.ndarray] = []
    try:
        for start in range(0, len(tensors), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tensors[start:start + batch_size]))
            if loaded.metadata.task == "detection":
                detect(loaded.model, batch)  # type: ignore[arg-type]
            else:
                with torch.inference_mode():
                    loaded.model(batch)
            out.append(tap.take())
    finally:
        tap.close()
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit_gate(loaded: LoadedBundle, fit: np.ndarray, val: np.ndarray, *,
             quantile: float = DEFAULT_QUANTILE, fitted_on: str = "",
             layer: str = "") -> OodGate:
    """The gate of ``loaded`` from fit and validation model inputs (N, C, S, S), on the
    pooled output of ``layer`` (default :func:`ai.ood.feature_layer`)."""
    if not QUANTILE_RANGE[0] <= quantile <= QUANTILE_RANGE[1]:
        raise OodFitError(f"quantile {quantile} must lie in {list(QUANTILE_RANGE)}")
    if len(fit) < MIN_IMAGES or len(val) < MIN_IMAGES:
        raise OodFitError(f"the gate needs at least {MIN_IMAGES} fit and {MIN_IMAGES} "
                          f"validation images, got {len(fit)} and {len(val)}")  # fmt: skip
    layer = layer or feature_layer(loaded.metadata)
    mean, cov, shrinkage = ledoit_wolf(features(loaded, fit, layer))
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    probe = OodGate(mean, precision, 1.0, quantile, layer, len(fit), len(val), shrinkage)
    val_scores = probe.scores(features(loaded, val, layer))
    threshold = float(np.quantile(val_scores, quantile, method="higher"))
    logger.info("ood gate %s: D=%d, shrinkage %.3f, threshold %.2f (%.1f %% of %d validation "
                "images pass)", loaded.metadata.name, len(mean), shrinkage, threshold,
                100 * quantile, len(val))  # fmt: skip
    return OodGate(mean, precision, threshold, quantile, layer, len(fit), len(val), shrinkage,
                   fitted_on=fitted_on)  # fmt: skip


def read_inputs(loaded: LoadedBundle, files: Sequence[Path]) -> np.ndarray:
    """Model inputs of DICOM ``files`` through the node's preprocessing (unreadable: error)."""
    params = loaded.metadata.input.preprocess_params()
    out = []
    for path in files:
        try:
            if is_image_file(Path(path)):  # PNG / JPEG (ChestX-ray14), as training fit reads
                tensor = load_image_file(Path(path), params)
            else:
                tensor, _ = preprocess(pydicom.dcmread(path), params)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            raise OodFitError(f"{path}: cannot be read as a model input ({exc})") from exc
        out.append(tensor)
    return np.stack(out) if out else np.zeros((0, params.channels, params.size, params.size))


def split_files(files: Sequence[Path], val_fraction: float = 0.4, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(fit, val) split of ``files`` by a hash of each path relative to the files' common
    folder: stable wherever that folder is (a temporary one included), no shared file."""
    root = Path(os.path.commonpath([Path(p).parent for p in files])) if files else Path()

    def key(path: Path) -> str:
        return hashlib.sha256(f"{seed}:{Path(path).relative_to(root)}".encode()).hexdigest()

    ranked = sorted(files, key=key)
    cut = int(round(len(ranked) * (1 - val_fraction)))
    return ranked[:cut], ranked[cut:]


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder``: DICOM (``*.dcm`` or the DICM preamble), PNG, JPEG."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and is_image_file(path):
            found.append(path)
        elif path.is_file():
            with path.open("rb") as fh:
                head = fh.read(132)
            if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
                found.append(path)
    if not found:
        raise OodFitError(f'"{folder}" holds no DICOM, PNG or JPEG images')
    return found


def gate_bundle(bundle_dir: Path, fit_files: Sequence[Path], val_files: Sequence[Path], *,
                quantile: float = DEFAULT_QUANTILE, fitted_on: str = "",
                layer: str = "") -> OodGate:
    """Fit the gate of the bundle at ``bundle_dir`` and write it into the bundle."""
    loaded = load_bundle(bundle_dir)
    gate = fit_gate(loaded, read_inputs(loaded, fit_files), read_inputs(loaded, val_files),
                    quantile=quantile, fitted_on=fitted_on, layer=layer)  # fmt: skip
    save_bundle(bundle_dir, loaded.metadata, loaded.model, gate=gate)
    return gate


def gate_run(bundle_dir: Path, train: Sequence[T], val: Sequence[T],
             load: Callable[[T], np.ndarray], *, seed: int,
             quantile: float = DEFAULT_QUANTILE) -> OodGate | None:
    """``training fit``'s gate: fitted on (at most :data:`RUN_FIT_CAP` of) the run's train
    split, the threshold from its val split; ``load`` gives an item's model input (the
    run's own image cache: nothing is decoded twice). A split too small for a gate leaves
    the bundle without one (logged), as an imported bundle without ``--ood-images``."""
    rng = np.random.default_rng(seed)
    fit = [train[i] for i in sorted(rng.permutation(len(train))[:RUN_FIT_CAP])]
    val = [val[i] for i in sorted(rng.permutation(len(val))[:RUN_FIT_CAP])]
    if len(fit) < MIN_IMAGES or len(val) < MIN_IMAGES:
        logger.warning("no ood gate: %d train and %d val images are too few", len(fit), len(val))
        return None
    loaded = load_bundle(bundle_dir)
    gate = fit_gate(loaded, np.stack([load(x) for x in fit]), np.stack([load(x) for x in val]),
                    quantile=quantile,
                    fitted_on=f"training fit: {len(fit)} train and {len(val)} val images")
    save_bundle(bundle_dir, loaded.metadata, loaded.model, gate=gate)
    return gate


def frontal_files(labels_csv: Path) -> list[Path]:
    """The frontal (PA/AP) images a synth ``labels.csv`` lists."""
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("view", "PA") in ("PA", "AP")]
    return [labels_csv.parent / r["path"] for r in rows]


def phantom_sizes(size: int | tuple[int, int], quick: bool = False,
                  seed: int = 0) -> list[tuple[int, int] | None]:
    """The image sizes a demo gate is fitted on. The node scales every image to the model
    input, and what that leaves (noise texture, letterbox padding, where the content falls
    on the network's stride grid) depends on the source's size and aspect, sharply for the
    detector: fitted at a few sizes, its gate withheld every phantom of some sizes between
    them (704 x 768: 14 of 14) and passed its neighbours. So the gate sees the build's own
    size in three aspects, ``scripts/demo.py``'s 1024 x 896, and :data:`RANDOM_SIZES` sizes
    drawn at random (long side log-uniform from :data:`RANDOM_SIDE_MIN` or the build's size
    to :data:`RANDOM_SIDE_MAX`, short / long side uniform in 0.75..1, portrait or
    landscape), a few studies each; full builds add synth's realistic plate sizes (None).
    ``quick`` (test builds) stops at 1024 px: the plate sizes cost most of a quick build's
    time."""
    rows, cols = (size, size) if isinstance(size, int) else size
    side = max(rows, cols)
    narrow = max(64, int(side * 0.8))
    sizes: list[tuple[int, int] | None] = [(rows, cols), (side, narrow), (narrow, side),
                                           (1024, 896)]
    rng = np.random.default_rng(seed)
    low, top = max(side, RANDOM_SIDE_MIN), RANDOM_SIDE_MAX[quick]
    for _ in range(RANDOM_SIZES[quick]):
        long = int(round(low * (top / low) ** rng.uniform(0, 1)))
        short = int(round(long * rng.uniform(0.75, 1.0)))
        sizes.append((long, short) if rng.uniform() < 0.5 else (short, long))
    return sizes if quick else [*sizes, None]


def phantom_files_of_sizes(folder: Path, studies: int, seed: int,
                           sizes: Sequence[tuple[int, int] | None]) -> list[Path]:
    """Frontal DICOM phantoms, ``studies`` spread over ``sizes`` (one synth run each). synth
    uses its variants in turn from the first, so each run starts where the last one stopped:
    with a few studies per size, every run starting afresh would only ever write the first
    few variants (the gate then withheld the others)."""
    from training.synth import ANALYSABLE_VARIANTS, synthesize

    names, done = list(ANALYSABLE_VARIANTS), 0
    files: list[Path] = []
    for k, size in enumerate(sizes):
        count = studies // len(sizes) + (1 if k < studies % len(sizes) else 0)
        if count:
            turn = done % len(names)
            summary = synthesize(folder / f"size{k}", count, seed + 1000 * k, size=size,
                                 variants=names[turn:] + names[:turn])
            files += frontal_files(summary.labels_csv)
            done += count
    return files


def gate_on_phantoms(bundle_dir: Path, *, quick: bool, size: int | tuple[int, int],
                     seed: int, quantile: float = DEFAULT_QUANTILE, layer: str = "") -> OodGate:
    """The demo bundles' gate: DICOM phantoms written by :mod:`training.synth` (every
    variant the node reads, the sizes of :func:`phantom_sizes`), split into fit and
    validation images; ``layer`` as :func:`fit_gate`."""
    sizes, studies = phantom_sizes(size, quick, seed), DEMO_GATE_STUDIES[quick]
    with tempfile.TemporaryDirectory(prefix="cxr-ood-") as tmp:
        files = phantom_files_of_sizes(Path(tmp), studies, seed, sizes)
        fit, val = split_files(files, 0.4, seed)
        return gate_bundle(bundle_dir, fit, val, quantile=quantile, layer=layer,
                           fitted_on=f"{studies} DICOM phantom studies (training.synth) "
                           f"at {len(sizes)} sizes, seed {seed}")  # fmt: skip
