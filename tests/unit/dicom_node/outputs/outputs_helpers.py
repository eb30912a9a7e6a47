"""Sources and results for the output tests: small generated radiographs, real files.

The generated images are uncompressed CR/DX, MONOCHROME1 and 2, non-square, with a VOI
window, a VOI LUT sequence or neither, so every branch of the grayscale pipeline is hit.
Their pixel values are a smooth ramp, so "unchanged grey" is easy to predict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from ai.types import BoundingBox, CodedConcept, Finding, ImageResult, ModelIdentity

REAL_DIR = Path("/work/shared/realdicom")
CR_J2K = REAL_DIR / "cr_chest_pa_philips_j2k.dcm"
NIH_SC = REAL_DIR / "dx_chest_nih_cxr14_sc.dcm"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"

DETECTOR = ModelIdentity("CXR detector", "2.1.0", "2.25.111", "detection")
DEMO = ModelIdentity("CXR classifier DEMO", "0.1", "2.25.222", "classification", demo=True)
NODULE = CodedConcept("27925004", "SCT", "Nodule")
CARDIOMEGALY = CodedConcept("287272002", "SCT", "Cardiomegaly")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")


def make_source(
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    rows: int = 300,
    cols: int = 200,
    voi: str | None = "window",
    sop_uid: str = "1.2.826.0.1.3680043.8.498.2.1",
    study_uid: str = STUDY_UID,
    series_uid: str = "1.2.826.0.1.3680043.8.498.3",
    type2: bool = True,
) -> Dataset:
    """A small uncompressed 12-bit radiograph with a horizontal ramp 0..4000."""
    ramp = np.linspace(0, 4000, cols, dtype=np.float64)
    pixels = np.tile(ramp, (rows, 1)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else DigitalXRayImageStorageForPresentation
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SpecificCharacterSet = "ISO_IR 100"
    if type2:
        ds.PatientName = "Canary^Patient"
        ds.PatientID = "CANARY-ID"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "O"
        ds.AccessionNumber = "CANARY-ACC"
        ds.StudyID = "1"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101010"
        ds.ReferringPhysicianName = "ward"
        ds.PatientOrientation = ["L", "F"]
        ds.BodyPartExamined = "CHEST"
    else:
        ds.PatientID = "CANARY-ID"  # the only identifying attribute left
    if modality == "DX":
        ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if voi == "window":
        ds.WindowCenter, ds.WindowWidth = 2000, 4000
    elif voi == "lut":
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = list(range(0, 65536, 16))  # 4096 entries, linear 0..65520
        item.LUTExplanation = "linear"
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.tobytes()
    return ds


def make_result(
    ds: Dataset,
    *,
    box: BoundingBox | None = None,
    heat_box: tuple[int, int, int, int] | None = None,
    positive: bool = True,
    model: ModelIdentity = DETECTOR,
) -> ImageResult:
    """A nodule finding (with ``box``), a negative cardiomegaly, an unboxed effusion."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    heatmap = None
    if heat_box is not None:
        r0, r1, c0, c1 = heat_box
        heatmap = np.zeros((rows, cols), np.float32)
        heatmap[r0:r1, c0:c1] = 0.9
    findings = [
        Finding("Nodule", NODULE, 0.91 if positive else 0.2, 0.5, positive, model, box),
        Finding("Cardiomegaly", CARDIOMEGALY, 0.12, 0.5, False, model),
        Finding("Effusion", EFFUSION, 0.66 if positive else 0.1, 0.5, positive, model),
    ]
    return ImageResult(
        str(ds.SOPInstanceUID), rows, cols, findings=findings, heatmap=heatmap, models=[model]
    )


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
