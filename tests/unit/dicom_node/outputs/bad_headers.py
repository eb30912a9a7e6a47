"""Headers as real files carry them: values written byte for byte, VR rules or not.

pydicom refuses to *write* most invalid values, so :func:`with_raw_values` puts them into
the file as raw elements (the bytes go out unchanged) and reads the file back the way the
worker does (:func:`dicom_node.dicomio.read_untrusted`), so the outputs meet exactly what
a PACS would have sent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.dicomio import read_untrusted

# The cases the field trial met (issue 7), each a (keyword, raw value) pair.
FIELD_CASES: dict[str, tuple[str, bytes]] = {
    "hash in a DA": ("StudyDate", b"9f86d081884c7d65"),
    "SH longer than 16": ("AccessionNumber", b"ACC-2024-000000012345"),
    "SH StudyID too long": ("StudyID", b"STUDY-ID-1234567890"),
    "retired PN, comma form": ("PatientName", b"DOE, JOHN Q"),
    "PN with seven components": ("ReferringPhysicianName", b"A^B^C^D^E^F^G"),
    "PN with four groups": ("PatientName", b"Doe^J=D^J=d^j=x"),
    "bad TM": ("StudyTime", b"25:61:00"),
    "AS without unit": ("PatientAge", b"81"),
    "DS not a number": ("PatientWeight", b"n/a "),
    "IS not an integer": ("SeriesNumber", b"1.5 "),
    "LO too long": ("StudyDescription", b"X" * 80),
    "control character": ("InstitutionName", b"Ward\x07 7"),
    "wrong VM": ("PatientOrientation", b"L\\F\\A "),
    "CS lower case": ("PatientSex", b"male"),
    "date range in DA": ("PatientBirthDate", b"19500101-19600101"),
}
# UIDs that break UID rules but must be copied exactly (leading zeros in a component).
ZERO_STUDY_UID = "1.2.826.0.1.3680043.8.498.01.7"
ZERO_SERIES_UID = "1.2.826.0.1.3680043.8.498.02.7"
ZERO_SOP_UID = "1.2.826.0.1.3680043.8.498.03.7"


def with_raw_values(ds: Dataset, values: Mapping[str, bytes], path: Path) -> Dataset:
    """Write ``ds`` with ``values`` (keyword -> raw bytes) and read it back untrusted."""
    copy = Dataset(ds)
    copy.file_meta = ds.file_meta
    for keyword, raw in values.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        if len(raw) % 2:
            raw += b"\x00" if dictionary_VR(tag) == "UI" else b" "
        copy[tag] = RawDataElement(
            tag, dictionary_VR(tag), len(raw), raw, 0, False, True
        )
    with warnings.catch_warnings():  # invalid on purpose: pydicom warns when copying them
        warnings.simplefilter("ignore")
        copy.save_as(path, enforce_file_format=True)
    return read_untrusted(path)


def small_real_header(real: Dataset, size: int = 96) -> Dataset:
    """The real file's header on a small uncompressed ramp: fast to render and validate."""
    ds = Dataset(real)
    ds.file_meta = pydicom.dataset.FileMetaDataset(real.file_meta)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio",
                    "LossyImageCompressionMethod", "ImagerPixelSpacing", "PixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    ramp = np.tile(np.linspace(0, 4000, size), (size, 1)).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    return ds


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's ``Error`` lines for the file at ``path``."""
    if shutil.which("dciodvfy") is None:
        raise RuntimeError("dciodvfy (dicom3tools) is not installed; make test installs it")
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def about_copied_uid(line: str, uids: set[str]) -> bool:
    """True for a dciodvfy error that is about one of ``uids`` (copied from the source)."""
    return any(re.search(rf"\b{re.escape(uid)}\b", line) for uid in uids)
