"""A worker's warm-up: one synthetic radiograph analysed and its outputs built before the
worker says it is ready, so the first study after a start is as fast as the next ones.

Why: the first job in a fresh worker paid about 0.9 s on top of the usual 0.5 s (the demo
pair, a 3000 x 2500 JPEG Lossless CR, 2 cores, measured): highdicom reads the DICOM
standard's module tables on first use (about 0.34 s), the SR's code dictionaries and the SC
encoder's modules are imported, torch builds its first kernels. A PACS that restarts the
node at night, or a node restarted by a deployment or a crash, handed that to the
radiologist's first study. Inference servers warm a model the same way (Triton's
``model_warmup``, TorchServe's warm-up requests).

Nothing is stored, sent or logged about the image: it is made here (a smooth 12-bit
gradient, no patient), analysed by the worker's own analyzer and given to the same output
builders a job uses, and the objects are dropped. A warm-up that fails is logged and the
worker starts anyway: it only costs the first study its extra time.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from ai.types import Analyzer
from dicom_node.outputs import OutputSettings, build_outputs

logger = logging.getLogger(__name__)

COMPUTED_RADIOGRAPHY = ComputedRadiographyImageStorage  # pydicom's, not a copy
WARM_UP_SIDE = 1024  # pixels: the models see their own input size whatever the source's


def synthetic_radiograph(side: int = WARM_UP_SIDE) -> pydicom.Dataset:
    """An uncompressed 12-bit MONOCHROME2 chest CR of ``side`` x ``side`` with a bright
    blob in the middle, made up here (no patient): what the warm-up analyses."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = COMPUTED_RADIOGRAPHY
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "WARM-UP^SYNTHETIC", "WARM-UP"
    ds.PatientBirthDate = ds.PatientSex = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "000000", "WARM-UP"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    pixels = 1500.0 + 2000.0 * np.exp(-(x * x + y * y) / 0.05)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def warm_up(analyzer: Analyzer, settings: OutputSettings) -> float | None:
    """Analyse :func:`synthetic_radiograph` and build its outputs (discarded); the seconds
    it took, or None when it failed (logged; the caller goes on)."""
    start = time.perf_counter()
    try:
        ds = synthetic_radiograph()
        (result,) = analyzer.analyze([ds])
        build_outputs([(ds, result)], settings, "warm-up")
    except Exception as exc:  # noqa: BLE001 - a warm-up must never keep a worker down
        logger.warning("warm-up failed (%s: %s); the first study pays the first-use costs",
                       type(exc).__name__, exc)
        return None
    took = time.perf_counter() - start
    logger.info("warm-up: a synthetic image analysed and its outputs built in %.2f s", took)
    return took
