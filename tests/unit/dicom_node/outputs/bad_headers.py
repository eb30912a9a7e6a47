"""Headers as real files carry them: values written byte for byte, VR rules or not.

pydicom refuses to *write* most invalid values, so :func:`with_raw_values` puts them into
the file as raw elements (the bytes go out unchanged) and reads the file back the way the
worker does (:func:`dicom_node.dicomio.read_untrusted`), so the outputs meet exactly what
a PACS would have sent.
"""

from __future__ import annotations

import copy as copy_module
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.dicomio import read_untrusted
from dicom_node.outputs.sanitise import silent_pydicom

# The cases the field trial met (issue 7), each a (keyword, raw value) pair.
FIELD_CASES: dict[str, tuple[str, bytes]] = {
    "hash in a DA": ("StudyDate", b"9f86d081884c7d65"),
    "SH longer than 16": ("AccessionNumber", b"ACC-2024-000000012345"),
    "SH StudyID too long": ("StudyID", b"STUDY-ID-1234567890"),
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
    "C1 control character": ("StudyDescription", b"Thorax \x91PA\x92"),
    "empty value among several": ("ImagerPixelSpacing", b"0.15\\"),
    "PN longer than 64": ("ReferringPhysicianName", b"Longname" * 5 + b"^" + b"Given" * 6),
}
# Odd, but valid for their VR: copied exactly as received.
ODD_BUT_VALID: dict[str, tuple[str, bytes]] = {
    "PN in ACR-NEMA comma form": ("PatientName", b"DOE, JOHN Q"),
    "PN of one component": ("ReferringPhysicianName", b"ward"),
}
# UIDs that break UID rules but must be copied exactly (leading zeros in a component).
ZERO_STUDY_UID = "1.2.826.0.1.3680043.8.498.01.7"
ZERO_SERIES_UID = "1.2.826.0.1.3680043.8.498.02.7"
ZERO_SOP_UID = "1.2.826.0.1.3680043.8.498.03.7"


def detached(ds: Dataset) -> Dataset:
    """A copy whose edits leave ``ds`` alone: ``Dataset(ds)`` shares the element dictionary
    and setting an existing attribute edits the element object itself, so both are new
    (values, pixel data included, stay shared; raw elements are immutable tuples)."""
    copy = Dataset({tag: shallow_element(ds.get_item(tag)) for tag in ds.keys()})
    if hasattr(ds, "file_meta"):
        copy.file_meta = FileMetaDataset(detached(ds.file_meta))
    return copy


def shallow_element(elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
    return elem if isinstance(elem, RawDataElement) else copy_module.copy(elem)


def raw_element(keyword: str, raw: bytes) -> RawDataElement:
    """An explicit VR little endian element holding ``raw`` exactly (padded to even)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def raw_item(values: Mapping[str, bytes]) -> Dataset:
    """A sequence item of raw elements (e.g. a code whose CodeMeaning is too long)."""
    item = Dataset()
    for keyword, raw in values.items():
        element = raw_element(keyword, raw)
        item[element.tag] = element
    return item


BAD_CODE_ITEM = {"CodeValue": b"X1", "CodingSchemeDesignator": b"99LOCAL",
                 "CodeMeaning": b"M" * 80}  # fmt: skip


def with_raw_values(ds: Dataset, values: Mapping[str, bytes], path: Path) -> Dataset:
    """Write ``ds`` with ``values`` (keyword -> raw bytes) and read it back untrusted."""
    copy = correct_ambiguous_vr(detached(ds), is_little_endian=True)
    for keyword, raw in values.items():
        element = raw_element(keyword, raw)
        copy[element.tag] = element
    # written as read (explicit VR little endian, same character set): raw elements go out
    # byte for byte instead of being decoded and re-encoded by pydicom
    copy.set_original_encoding(False, True, copy._character_set)
    with silent_pydicom():  # invalid on purpose: pydicom would warn and log the values
        copy.save_as(path, enforce_file_format=True)
    return read_untrusted(path)


def small_real_header(real: Dataset, size: int = 96) -> Dataset:
    """The real file's header on a small uncompressed ramp: fast to render and validate."""
    ds = detached(real)
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
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60, check=False)
    text = (proc.stdout + proc.stderr).decode("latin-1")  # it echoes values, in any charset
    return [line for line in text.splitlines() if line.startswith("Error")]


def about_copied_uid(line: str, uids: set[str]) -> bool:
    """True for a dciodvfy error that is about one of ``uids`` (copied from the source)."""
    return any(re.search(rf"\b{re.escape(uid)}\b", line) for uid in uids)
