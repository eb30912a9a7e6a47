"""Phantom chest radiographs written as real DICOM, with the variety of PACS traffic.

Each *variant* fixes what a receiving node has to cope with: SOP class (CR,
DX for presentation / for processing, CT), photometric interpretation, bits
stored, modality LUT (rescale), VOI (window, LUT sequence, none), transfer
syntax and view.  :func:`make_dataset` builds one instance;
:func:`synthesize` writes whole patients/studies plus labels
(``labels.csv``, YOLO-style ``boxes.json``, ``classes.txt``, and ``locations.json``: each
finding's box and the lung mask, what Grad-CAM localisation is measured against).

All identifiers and UIDs are derived from the seed
(:func:`pydicom.uid.generate_uid` with entropy sources), so a seed always
yields the same files.  Patient names are obviously synthetic.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ai.reference.localisation import LOCATIONS_FILE, image_entry, write_locations
from training import jpeg_lossless
from training.errors import TrainingError
from training.phantoms import FINDINGS, Phantom, render_ct_slice, render_phantom

logger = logging.getLogger(__name__)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
_SOP_CLASSES = {"cr": CR_STORAGE, "dx": DX_PRESENTATION, "dx_proc": DX_PROCESSING, "ct": CT_STORAGE}

REALISTIC_SIZES: tuple[tuple[int, int], ...] = (
    (2140, 1760),  # 35 x 43 cm CR plate, portrait
    (1760, 2140),
    (2500, 2048),
    (2048, 2500),
    (2000, 2500),
    (2836, 2336),
    (3000, 3000),
    (2048, 2048),
    (1024, 1024),
    (512, 640),
)
_VIEW_CODES = {  # CID 4010 view codes (SNOMED CT: 399348003 is AP, 399067008 "lateral")
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
    "LL": ("399173006", "left lateral"),
}
_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LL": ["P", "F"]}
_GIVEN = ("ALEX", "SAM", "ROBIN", "KIM", "JORDAN", "CHRIS", "TAYLOR", "JESSE", "MORGAN", "CASEY")
_MAKERS = (
    ("Phantom Imaging Works", "PIW DR-1"),
    ("Northwind Radiography", "NW-CR 500"),
    ("Contoso Medical", "Contoso DX Flex"),
)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class SynthError(TrainingError, ValueError):
    """Raised for bad synthesis requests (unknown variant, bad size or count)."""


@dataclass(frozen=True)
class Variant:
    """What one kind of instance looks like on the wire."""

    name: str
    description: str
    sop: str  # key of _SOP_CLASSES
    photometric: str
    bits_stored: int
    transfer_syntax: UID
    voi: str = "window"  # "window", "lut" or "none"
    rescale: bool = False
    view: str = "PA"
    analysable: bool = True


_VARIANTS: tuple[Variant, ...] = (
    Variant("dx_mono2_explicit", "DX for presentation, MONOCHROME2, 14 bit, Explicit VR LE, window",
            "dx", "MONOCHROME2", 14, ExplicitVRLittleEndian),
    Variant("dx_mono1_j2k", "DX for presentation, MONOCHROME1, 12 bit, JPEG 2000 lossless, window",
            "dx", "MONOCHROME1", 12, JPEG2000Lossless),
    Variant("cr_mono1_jpeg_lossless", "CR, MONOCHROME1, 12 bit, JPEG Lossless SV1 (.70), window",
            "cr", "MONOCHROME1", 12, JPEGLosslessSV1),
    Variant("cr_mono2_jpegls", "CR, MONOCHROME2, 12 bit, JPEG-LS lossless, AP bedside, no VOI",
            "cr", "MONOCHROME2", 12, JPEGLSLossless, voi="none", view="AP"),
    Variant("dx_mono2_rle", "DX for presentation, MONOCHROME2, 16 bit, RLE lossless, window",
            "dx", "MONOCHROME2", 16, RLELossless),
    Variant("cr_mono1_voi_lut_seq", "CR, MONOCHROME1, 12 bit, Explicit VR LE, VOI LUT Sequence",
            "cr", "MONOCHROME1", 12, ExplicitVRLittleEndian, voi="lut"),
    Variant("dx_mono2_implicit_12bit", "DX for presentation, MONOCHROME2, 12 bit, Implicit VR LE, window",
            "dx", "MONOCHROME2", 12, ImplicitVRLittleEndian),
    Variant("cr_mono2_16bit_rescale", "CR, MONOCHROME2, 16 bit, rescale slope/intercept, no VOI",
            "cr", "MONOCHROME2", 16, ExplicitVRLittleEndian, voi="none", rescale=True),
    Variant("cr_mono2_10bit_ap", "CR, MONOCHROME2, 10 bit, AP, JPEG Lossless SV1, window",
            "cr", "MONOCHROME2", 10, JPEGLosslessSV1, view="AP"),
    Variant("dx_processing_15bit", "DX for processing, MONOCHROME2, 15 bit, JPEG-LS lossless, no VOI",
            "dx_proc", "MONOCHROME2", 15, JPEGLSLossless, voi="none"),
    Variant("dx_mono1_voi_lut_rle", "DX for presentation, MONOCHROME1, 14 bit, RLE, VOI LUT Sequence",
            "dx", "MONOCHROME1", 14, RLELossless, voi="lut"),
    Variant("dx_lateral", "DX for presentation, left lateral (ViewPosition LL): not analysed",
            "dx", "MONOCHROME2", 14, ExplicitVRLittleEndian, view="LL", analysable=False),
    Variant("ct_slice", "CT Image Storage axial slice (Modality CT): not a radiograph, ignored",
            "ct", "MONOCHROME2", 12, ExplicitVRLittleEndian, voi="window", rescale=True,
            view="", analysable=False),
)  # fmt: skip
VARIANT_SPECS: dict[str, Variant] = {v.name: v for v in _VARIANTS}
VARIANTS: dict[str, str] = {v.name: v.description for v in _VARIANTS}
ANALYSABLE_VARIANTS: tuple[str, ...] = tuple(v.name for v in _VARIANTS if v.analysable)


# --------------------------------------------------------------------------- patient / study


def _uid(seed: int | str, *parts: str) -> UID:
    return generate_uid(entropy_srcs=["cxr-phantom", str(seed), *parts])


def _rng(*parts: int | str) -> np.random.Generator:
    key = [int.from_bytes(str(p).encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    return np.random.default_rng([*key, len(parts)])


@dataclass(frozen=True)
class Patient:
    """Synthetic patient demographics (never real people)."""

    name: str
    patient_id: str
    birth_date: str
    sex: str

    @classmethod
    def from_seed(cls, seed: int) -> Patient:
        rng = np.random.default_rng([seed, 0x5A71E])
        sex = str(rng.choice(["F", "M", "O"], p=[0.48, 0.48, 0.04]))
        born = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
        name = f"PHANTOM^{_GIVEN[int(rng.integers(len(_GIVEN)))]}{int(rng.integers(100, 999))}"
        return cls(name, f"PH{int(rng.integers(10**7, 10**8))}", born.strftime("%Y%m%d"), sex)


@dataclass
class StudyContext:
    """One study: shared by every image made with it (same patient, same StudyInstanceUID)."""

    patient: Patient
    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    description: str = "XR CHEST"
    _series: int = field(default=0, repr=False)

    @classmethod
    def from_seed(cls, seed: int, patient: Patient | None = None) -> StudyContext:
        """A study for ``patient`` (default: a patient derived from the same seed)."""
        rng = np.random.default_rng([seed, 0x57D1])
        day = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        secs = int(rng.integers(7 * 3600, 20 * 3600))
        return cls(
            patient=patient or Patient.from_seed(seed),
            study_instance_uid=_uid(seed, "study"),
            accession_number=f"A{int(rng.integers(10**8, 10**9))}",
            study_id=str(int(rng.integers(1, 99999))),
            study_date=day.strftime("%Y%m%d"),
            study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        )

    def next_series_number(self) -> int:
        """Series numbers 1, 2, ... in the order images are made for this study."""
        self._series += 1
        return self._series


@dataclass(frozen=True)
class SyntheticImage:
    """A dataset plus the phantom ground truth that went into it."""

    dataset: Dataset
    variant: Variant
    phantom: Phantom | None  # None for the CT variant
    pixels: np.ndarray  # the stored values that were encoded (lossless: what decoding must give)


# --------------------------------------------------------------------------- pixels


def _stored_values(image: np.ndarray, var: Variant, rng: np.random.Generator) -> np.ndarray:
    """Map the phantom's [0, 1] intensity onto the variant's stored range."""
    top = (1 << var.bits_stored) - 1
    lo = rng.uniform(0.0, 0.06) * top
    hi = rng.uniform(0.85, 1.0) * top
    values = image if var.photometric == "MONOCHROME2" else 1.0 - image
    return np.clip(np.rint(lo + values * (hi - lo)), 0, top).astype(np.uint16)


def _window(stored: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
    """A diagnostic window from robust percentiles (what a modality would burn in)."""
    sample = stored[::4, ::4].astype(np.float64) * slope + intercept
    lo, hi = np.percentile(sample, [1.0, 99.5])
    return round((lo + hi) / 2, 1), round(max(hi - lo, 2.0), 1)


def _voi_lut(stored: np.ndarray) -> Dataset:
    """A sigmoid VOI LUT covering the data range (16-bit entries: PS3.3 allows 8 or 16)."""
    lo, hi = (int(v) for v in np.percentile(stored[::4, ::4], [0.5, 99.8]))
    hi = min(max(hi, lo + 16), lo + 65534)
    x = np.arange(lo, hi + 1, dtype=np.float64)
    centre, width = (lo + hi) / 2, (hi - lo) / 6
    data = np.rint(65535 / (1 + np.exp(-(x - centre) / width))).astype("<u2")
    item = Dataset()
    item.add_new(0x00283002, "US", [len(x), lo, 16])
    item.LUTExplanation = "SIGMOID PHANTOM"
    item.add_new(0x00283006, "OW", data.tobytes())
    return item


def _set_pixels(ds: Dataset, stored: np.ndarray, var: Variant) -> None:
    ds.file_meta.TransferSyntaxUID = var.transfer_syntax
    if var.transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = stored.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    elif var.transfer_syntax == JPEGLosslessSV1:
        ds.PixelData = encapsulate([jpeg_lossless.encode(stored, var.bits_stored)])
        ds["PixelData"].VR = "OB"
    else:
        # pydicom's own RLE encoder is pure Python and slow on 3000 x 3000 images
        fast = (
            var.transfer_syntax == RLELossless
            and "pylibjpeg" in get_encoder(RLELossless).available_plugins
        )
        plugin = "pylibjpeg" if fast else ""
        ds.compress(
            var.transfer_syntax, stored, encoding_plugin=plugin, generate_instance_uid=False
        )


# --------------------------------------------------------------------------- headers


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXR_PHANTOM_1"
    return meta


def _common(
    ds: Dataset, study: StudyContext, var: Variant, seed: int, rng: np.random.Generator
) -> None:
    """Patient, study, series, equipment and SOP common attributes."""
    p = study.patient
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        p.name,
        p.patient_id,
        p.birth_date,
        p.sex,
    )
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
    ds.AccessionNumber, ds.StudyID = study.accession_number, study.study_id
    ds.StudyDescription = study.description if var.sop != "ct" else "CT CHEST"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.SeriesNumber = study.next_series_number()
    ds.InstanceNumber = 1
    ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study.study_time
    maker, model = _MAKERS[int(rng.integers(len(_MAKERS)))]
    ds.Manufacturer, ds.ManufacturerModelName = maker, model
    ds.InstitutionName = "Synthetic General Hospital"
    ds.StationName = f"XR{int(rng.integers(1, 9))}"
    ds.DeviceSerialNumber = str(int(rng.integers(10**5, 10**6)))
    ds.SoftwareVersions = "phantom-1.0"
    ds.BodyPartExamined = "CHEST"
    ds.ImageComments = "Synthetic phantom image, not a patient"
    ds.SOPClassUID = _SOP_CLASSES[var.sop]
    ds.SOPInstanceUID = _uid(seed, "sop")
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)


def _image_pixel(ds: Dataset, rows: int, columns: int, var: Variant) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = var.photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, var.bits_stored, var.bits_stored - 1
    ds.PixelRepresentation = 0


def _projection(ds: Dataset, var: Variant, phantom: Phantom, rng: np.random.Generator) -> None:
    """CR/DX acquisition and positioning attributes."""
    is_dx = var.sop.startswith("dx")
    ds.Modality = "DX" if is_dx else "CR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if is_dx else ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = var.view
    ds.PatientOrientation = _ORIENTATION[var.view]
    ds.ImagerPixelSpacing = [round(phantom.pixel_spacing_mm, 6)] * 2
    if not is_dx and rng.random() < 0.5:
        ds.PixelSpacing = ds.ImagerPixelSpacing
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "Phantom nominal magnification"
    ds.KVP = f"{rng.uniform(100, 125) if var.view != 'AP' else rng.uniform(80, 95):.0f}"
    ds.ExposureTime = int(rng.integers(3, 20))
    ds.XRayTubeCurrent = int(rng.integers(100, 400))
    ds.DistanceSourceToDetector = "1800" if var.view in ("PA", "LL") else "1000"
    if is_dx:
        _dx_modules(ds, var)


def _dx_modules(ds: Dataset, var: Variant) -> None:
    ds.PresentationIntentType = "FOR PROCESSING" if var.sop == "dx_proc" else "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("43799004", "SCT", "Chest")])
    ds.ViewCodeSequence = Sequence(
        [_code(_VIEW_CODES[var.view][0], "SCT", _VIEW_CODES[var.view][1])]
    )
    ds.PositionerType = ""
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values = less x-ray intensity (MONOCHROME1 here)
    ds.PixelIntensityRelationshipSign = 1 if var.photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if var.photometric == "MONOCHROME1" else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = _ORIENTATION[var.view]


def _luts(ds: Dataset, stored: np.ndarray, var: Variant, rng: np.random.Generator) -> None:
    """Modality LUT (rescale) and VOI (window / LUT sequence / none)."""
    slope, intercept = 1.0, 0.0
    if var.rescale:
        slope, intercept = (
            float(rng.choice([0.25, 0.5, 2.0])),
            float(rng.choice([-1024.0, 0.0, 100.0])),
        )
    if var.rescale or var.sop.startswith("dx"):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.RescaleType = "US"
    if var.voi == "window":
        centre, width = _window(stored, slope, intercept)
        ds.WindowCenter, ds.WindowWidth = f"{centre:g}", f"{width:g}"
        ds.WindowCenterWidthExplanation = "PHANTOM DEFAULT"
        ds.VOILUTFunction = "LINEAR"
    elif var.voi == "lut":
        ds.VOILUTSequence = Sequence([_voi_lut(stored)])


def _ct(ds: Dataset, seed: int, rows: int, columns: int) -> np.ndarray:
    """CT Image module attributes; returns the stored pixel values."""
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = _uid(seed, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.PixelSpacing = [0.78125, 0.78125]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-200.0, -200.0, -150.0]
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    hu = render_ct_slice(seed, rows, columns)
    return (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)


# --------------------------------------------------------------------------- public API


def make_image(
    variant: str,
    *,
    seed: int,
    rows: int,
    columns: int,
    findings: dict[str, bool] | None = None,
    study: StudyContext | None = None,
) -> SyntheticImage:
    """Build one instance of ``variant`` and keep its ground truth (see :func:`make_dataset`)."""
    var = _variant(variant)
    if seed < 0:
        raise SynthError(f"Seed {seed} must be a non-negative integer")
    if not (64 <= rows <= 4096 and 64 <= columns <= 4096):
        raise SynthError(f"Image size {rows}x{columns} is out of range 64..4096")
    if not var.analysable and findings and any(findings.values()):
        raise SynthError(f'Variant "{variant}" is not analysable and cannot carry findings')
    rng = np.random.default_rng([seed, 0xD1C0])
    ds = Dataset()
    _common(ds, study or StudyContext.from_seed(seed), var, seed, rng)
    _image_pixel(ds, rows, columns, var)
    phantom: Phantom | None = None
    if var.sop == "ct":
        stored = _ct(ds, seed, rows, columns)
    else:
        wanted = findings if var.analysable else {}
        phantom = render_phantom(seed, rows, columns, view=var.view, findings=wanted)
        stored = _stored_values(phantom.image, var, rng)
        _projection(ds, var, phantom, rng)
        _luts(ds, stored, var, rng)
    _set_pixels(ds, stored, var)
    return SyntheticImage(ds, var, phantom, stored)


def make_dataset(
    variant: str,
    *,
    seed: int,
    rows: int,
    columns: int,
    findings: dict[str, bool] | None = None,
    study: StudyContext | None = None,
) -> Dataset:
    """One phantom instance as a pydicom Dataset (file meta included, ready to save).

    Args:
        variant: a key of :data:`VARIANTS`.
        seed: determines pixels, findings (when ``findings`` is None) and UIDs.
        rows, columns: image size, 64..4096.
        findings: findings to render (missing = absent); None draws each with
            probability 0.3. Must be empty/None for non-analysable variants.
        study: put the image in this study (same patient and StudyInstanceUID);
            None makes a new study from the seed.
    """
    return make_image(
        variant, seed=seed, rows=rows, columns=columns, findings=findings, study=study
    ).dataset


def _variant(name: str) -> Variant:
    try:
        return VARIANT_SPECS[name]
    except KeyError:
        raise SynthError(
            f'Variant "{name}" is not known; expected one of {", ".join(VARIANTS)}'
        ) from None


def write_dataset(ds: Dataset, path: Path) -> None:
    """Save as a DICOM Part 10 file (preamble, file meta), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def safe_name(value: str) -> str:
    """A file-system-safe path component derived from a DICOM value."""
    cleaned = _SAFE.sub("_", value).strip("._") or "unnamed"
    return cleaned[:64]


# --------------------------------------------------------------------------- data sets on disk

LABEL_COLUMNS: tuple[str, ...] = (
    "sop_instance_uid",
    "path",
    "study_instance_uid",
    "patient_id",
    "view",
    *FINDINGS,
)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote."""

    out_dir: Path
    images: int
    studies: int
    patients: int
    labels_csv: Path
    boxes_json: Path
    classes_txt: Path
    locations_json: Path
    positives: dict[str, int]
    variants: dict[str, int]


def parse_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Normalise ``size`` (N or (rows, columns)) and check its range."""
    if size is None:
        return None
    rows, cols = (size, size) if isinstance(size, int) else size
    if not (64 <= rows <= 4096 and 64 <= cols <= 4096):
        raise SynthError(f"Image size {rows}x{cols} is out of range 64..4096")
    return int(rows), int(cols)


def _plan_sizes(
    var: Variant, size: tuple[int, int] | None, rng: np.random.Generator
) -> tuple[int, int]:
    if size is not None:
        return size
    if var.sop == "ct":
        return 512, 512
    return REALISTIC_SIZES[int(rng.integers(len(REALISTIC_SIZES)))]


def synthesize(
    out_dir: Path,
    count: int,
    seed: int = 0,
    *,
    size: int | tuple[int, int] | None = None,
    variants: list[str] | None = None,
    prevalence: float = 0.3,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write ``count`` studies of phantoms with labels under ``out_dir``.

    Layout: ``<patient>/<study>/<sop>.dcm`` plus ``labels.csv``, ``boxes.json``
    (YOLO lines per relative path, empty list for negatives),
    ``classes.txt`` and ``locations.json`` (:mod:`ai.reference.localisation`).  About a quarter of the studies get a second image
    (same study, new series) and about a quarter reuse an earlier patient, so
    patient-level splits have something to do.  Each finding is present
    independently with probability ``prevalence`` (same findings for all the
    frontal images of a study; lateral and CT images carry none).  Variants are
    used in turn so a small ``count`` still covers them all.

    Args:
        progress: called with 1 after each study (e.g. ``tqdm.update``).
    """
    if count < 1:
        raise SynthError(f"Count {count} must be at least 1")
    if seed < 0:
        raise SynthError(f"Seed {seed} must be a non-negative integer")
    if not 0.0 <= prevalence <= 1.0:
        raise SynthError(f"Prevalence {prevalence} is not within 0..1")
    names = list(variants) if variants else list(ANALYSABLE_VARIANTS)
    for name in names:
        _variant(name)
    fixed = parse_size(size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x5EED])
    patients: list[Patient] = []
    rows: list[dict[str, str | int]] = []
    boxes: dict[str, list[str]] = {}
    locations: dict[str, dict] = {}
    used: dict[str, int] = {}
    for index in range(count):
        study_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        if patients and rng.random() < 0.25:
            patient = patients[int(rng.integers(len(patients)))]
        else:
            patient = Patient.from_seed(study_seed)
            patients.append(patient)
        study = StudyContext.from_seed(study_seed, patient)
        findings = {name: bool(rng.random() < prevalence) for name in FINDINGS}
        var = _variant(names[index % len(names)])
        for k in range(2 if rng.random() < 0.25 else 1):
            image_seed = int(np.random.SeedSequence([seed, index, k + 1]).generate_state(1)[0])
            shape = _plan_sizes(var, fixed, rng)
            wanted = findings if var.analysable else None
            img = make_image(
                var.name,
                seed=image_seed,
                rows=shape[0],
                columns=shape[1],
                findings=wanted,
                study=study,
            )
            rel = _write(out_dir, img)
            rows.append(_label_row(img, rel))
            boxes[rel] = [b.yolo() for b in img.phantom.boxes] if img.phantom else []
            if img.phantom is not None:
                locations[rel] = image_entry(
                    [(b.label, (b.x0, b.y0, b.x1, b.y1)) for b in img.phantom.boxes],
                    img.phantom.lungs)
            used[var.name] = used.get(var.name, 0) + 1
        if progress:
            progress(1)
    write_locations(out_dir / LOCATIONS_FILE, locations)
    return _write_labels(out_dir, rows, boxes, count, len(patients), used)


def _write(out_dir: Path, img: SyntheticImage) -> str:
    ds = img.dataset
    rel = Path(
        safe_name(str(ds.PatientID)),
        safe_name(ds.StudyInstanceUID),
        safe_name(ds.SOPInstanceUID) + ".dcm",
    )
    write_dataset(ds, out_dir / rel)
    logger.debug("wrote %s (%s)", ds.SOPInstanceUID, img.variant.name)
    return rel.as_posix()


def _label_row(img: SyntheticImage, rel: str) -> dict[str, str | int]:
    ds = img.dataset
    truth = img.phantom.findings if img.phantom else {}
    row: dict[str, str | int] = {
        "sop_instance_uid": ds.SOPInstanceUID,
        "path": rel,
        "study_instance_uid": ds.StudyInstanceUID,
        "patient_id": str(ds.PatientID),
        "view": img.variant.view or ds.Modality,
    }
    row.update({name: int(truth.get(name, False)) for name in FINDINGS})
    return row


def _write_labels(
    out_dir: Path,
    rows: list[dict[str, str | int]],
    boxes: dict[str, list[str]],
    studies: int,
    patients: int,
    used: dict[str, int],
) -> SynthSummary:
    labels_csv, boxes_json, classes_txt = (
        out_dir / "labels.csv",
        out_dir / "boxes.json",
        out_dir / "classes.txt",
    )
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    boxes_json.write_text(json.dumps(boxes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    classes_txt.write_text("\n".join(FINDINGS) + "\n", encoding="utf-8")
    positives = {name: sum(int(r[name]) for r in rows) for name in FINDINGS}
    logger.info("synthesized %d images in %d studies under %s", len(rows), studies, out_dir)
    return SynthSummary(out_dir, len(rows), studies, patients, labels_csv, boxes_json,
                        classes_txt, out_dir / LOCATIONS_FILE, positives, used)
