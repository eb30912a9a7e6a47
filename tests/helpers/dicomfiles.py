"""Tiny hand-made DICOM files for unit tests of the service (phantoms live in training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.ingest import Received

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def make_image(*, study_uid: str | None = None, sop_class: str = CR, modality: str = "CR",
               view: str = "PA", body_part: str = "CHEST", rows: int = 300, cols: int = 260,
               photometric: str = "MONOCHROME2", seed: int = 0,
               patient_name: str = "Test^Patient", patient_id: str = "P1") -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    return ds


def write(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def received(ds: Dataset, calling_ae: str = "PACS") -> Received:
    """``ds`` as the listener hands it to the ingestor (Explicit VR Little Endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, Dataset(ds))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, meta,
                    fp.getvalue(), calling_ae)


def write_phantom_study(folder: Path, n: int, *, seed: int, rows: int = 512, cols: int = 512,
                        variant: str = "dx_mono2_explicit", seed_step: int = 1000
                        ) -> tuple[str, list[Path]]:
    """``n`` phantom images of one study (training's synthesiser) written as ``imgNNN.dcm``
    under ``folder``; returns the Study Instance UID and the files. Image ``i`` has the seed
    ``seed * seed_step + i``."""
    from training.synth import StudyContext, make_dataset  # the phantoms' renderer is heavy

    study = StudyContext.from_seed(seed)
    files = []
    for i in range(n):
        ds = make_dataset(variant, seed=seed * seed_step + i, rows=rows, columns=cols,
                          study=study)
        path = folder / f"img{i:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study.study_instance_uid, files
