"""Phantom chest radiographs written as real DICOM, with the variety of PACS traffic.

Each *variant* fixes what a receiving node has to cope with: SOP class (CR,
DX for presentation / for processing, CT), photometric interpretation, bits
stored, modality LUT (rescale), VOI (window, LUT sequence, none), transfer
syntax and view.  :func:`make_dataset` builds one instance;
:func:`synthesize` writes whole patients/studies plus labels
(``labels.csv``, YOLO-style ``boxes.json``, ``classes.txt``).

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

from training import jpeg_lossless
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
_VIEW_CODES = {  # CID 4010 view codes (SNOMED CT)
    "PA": ("399348003", "postero-anterior"),
    "AP": ("399067008", "antero-posterior"),
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


class SynthError(ValueError):
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
    """A sigmoid VOI LUT covering the data range, 12-bit output entries."""
    lo, hi = (int(v) for v in np.percentile(stored[::4, ::4], [0.5, 99.8]))
    hi = min(max(hi, lo + 16), lo + 65534)
    x = np.arange(lo, hi + 1, dtype=np.float64)
    centre, width = (lo + hi) / 2, (hi - lo) / 6
    data = np.rint(4095 / (1 + np.exp(-(x - centre) / width))).astype("<u2")
    item = Dataset()
    item.add_new(0x00283002, "US", [len(x), lo, 12])
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
        plugin = "pylibjpeg" if var.transfer_syntax == RLELossless else ""
        ds.compress(var.transfer_syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
