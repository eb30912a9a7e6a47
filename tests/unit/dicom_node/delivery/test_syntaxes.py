"""Transfer syntaxes the node may send (lossless only, with an installed encoder), their
validation in the configuration, and in-memory transcoding that keeps the object."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.config import load_settings
from dicom_node.delivery.negotiation import preferred_syntaxes
from dicom_node.delivery.syntaxes import convert, resolve, sendable
from dicom_node.errors import ConfigError


def _rgb(ts: str = ExplicitVRLittleEndian) -> Dataset:
    arr = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 48, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    if ts != ExplicitVRLittleEndian:
        ds.compress(ts, generate_instance_uid=False)
    return ds


def test_resolve_keywords_and_uids() -> None:
    assert resolve("RLELossless") == RLELossless
    assert resolve(" 1.2.840.10008.1.2.4.80 ") == JPEGLSLossless
    with pytest.raises(ValueError, match="'RLE' is unknown"):
        resolve("RLE")


@pytest.mark.parametrize(("name", "why"), [
    ("JPEGBaseline8Bit", "lossy"), ("1.2.840.10008.1.2.4.91", "lossy"),
    ("JPEGLosslessSV1", "node does not send it"), ("Comprehensive SR", "unknown"),
    ("1.2.840.10008.5.1.4.1.1.7", "unknown"),  # a SOP class, not a transfer syntax
])
def test_only_lossless_encodable_syntaxes_are_sendable(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sendable(name)


def test_config_names_the_key_and_normalises_to_uids() -> None:
    dest = {"ae_title": "PACS", "host": "h", "port": 104}
    s = load_settings(None, environ={}, overrides={"destinations": [
        {**dest, "sc_transfer_syntaxes": ["JPEGLSLossless", "1.2.840.10008.1.2.1",
                                          "JPEGLSLossless"]}]})
    assert s.destinations[0].sc_transfer_syntaxes == [JPEGLSLossless, ExplicitVRLittleEndian]
    default = load_settings(None, environ={}, overrides={"destinations": [dest]})
    assert default.destinations[0].sc_transfer_syntaxes == [ExplicitVRLittleEndian,
                                                            ImplicitVRLittleEndian]
    with pytest.raises(ConfigError, match=r"destinations\.0\.sc_transfer_syntaxes: .*"
                                          r"'JPEGBaseline8Bit'.*lossy"):
        load_settings(None, environ={}, overrides={"destinations": [
            {**dest, "sc_transfer_syntaxes": ["JPEGBaseline8Bit"]}]})
    with pytest.raises(ConfigError, match=r"sc_transfer_syntaxes: .*at least one"):
        load_settings(None, environ={}, overrides={"destinations": [
            {**dest, "sc_transfer_syntaxes": []}]})


@pytest.mark.parametrize(("source", "target"), [
    (ExplicitVRLittleEndian, RLELossless), (ExplicitVRLittleEndian, JPEGLSLossless),
    (ExplicitVRLittleEndian, JPEG2000Lossless), (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    (RLELossless, ExplicitVRLittleEndian), (RLELossless, JPEGLSLossless),
])
def test_convert_keeps_the_object_and_its_pixels(source: str, target: str) -> None:
    ds = _rgb(source)
    uid, pixels = ds.SOPInstanceUID, copy.deepcopy(ds).pixel_array
    out = convert(ds, target)
    assert out.file_meta.TransferSyntaxUID == target and out.SOPInstanceUID == uid
    # what pynetdicom would put on the wire, read back
    from pynetdicom.dsutils import decode, encode

    t = pydicom.uid.UID(target)
    raw = encode(out, t.is_implicit_VR, t.is_little_endian, t.is_deflated)
    back = decode(pydicom.filebase.DicomBytesIO(raw), t.is_implicit_VR, t.is_little_endian,
                  t.is_deflated)
    back.file_meta = out.file_meta
    assert back.SOPInstanceUID == uid
    assert np.array_equal(back.pixel_array, pixels)


def test_sc_is_offered_in_its_written_syntax_first_unless_the_destination_names_its_own() -> None:
    dest = {"ae_title": "PACS", "host": "h", "port": 104}
    s = load_settings(None, environ={}, overrides={"destinations": [
        dest, {**dest, "port": 105, "sc_transfer_syntaxes": ["ExplicitVRLittleEndian"]}]})
    default, explicit = s.destinations
    assert preferred_syntaxes("sc", default, JPEGLSLossless) == (
        JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert preferred_syntaxes("sc", default, ExplicitVRLittleEndian) == (
        ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert preferred_syntaxes("sc", explicit, JPEGLSLossless) == (ExplicitVRLittleEndian,)
    assert preferred_syntaxes("sr", default, JPEGLSLossless) == (
        ExplicitVRLittleEndian, ImplicitVRLittleEndian)
