"""Helpers for the model-side tests: hand-made grey datasets and small random bundles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ai.bundle.load import save_bundle
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.codes import default_code
from ai.networks import build_network

LABELS = ("nodule", "cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation")
SMALL_DENSENET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 2, 2, 2]}


def grey_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: object,
) -> Dataset:
    """An uncompressed single-frame dataset holding ``pixels`` (uint8/uint16/int16)."""
    pixels = np.ascontiguousarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def make_bundle(
    directory: Path,
    *,
    name: str = "test-random",
    version: str = "0.0.1",
    thresholds: float | Sequence[float] = 0.5,
    size: int = 64,
    seed: int = 0,
    labels: Sequence[str] = LABELS,
    percentile_window: tuple[float, float] = (0.5, 99.5),
) -> BundleMetadata:
    """A randomly initialised small DenseNet bundle (fast to load and run)."""
    if isinstance(thresholds, float | int):
        thresholds = [float(thresholds)] * len(labels)
    torch.manual_seed(seed)
    spec = NetworkSpec("densenet", dict(SMALL_DENSENET))
    model = build_network(spec.name, spec.args, num_classes=len(labels)).module
    meta = BundleMetadata(
        name=name,
        version=version,
        labels=tuple(
            LabelSpec(n, default_code(n), t) for n, t in zip(labels, thresholds, strict=True)
        ),
        network=spec,
        input=InputSpec(size=size, percentile_window=percentile_window),
        training={"seed": seed},
        validation_metrics={},
    )
    return save_bundle(directory, meta, model)
