"""Deflated Explicit VR Little Endian instances, honest ones and deflate bombs."""

from __future__ import annotations

import io
import zlib

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

_ZEROS = bytes(1 << 20)


def explicit_le(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, pydicom.Dataset(ds))  # without the file meta
    return fp.getvalue()


def deflated_body(ds: pydicom.Dataset, *, zero_pixels: int | None = None) -> bytes:
    """The raw-deflated data set; with ``zero_pixels``, PixelData is that many zero bytes,
    streamed into the compressor (a bomb never exists inflated in the test process)."""
    out = io.BytesIO()
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    if zero_pixels is None:
        out.write(packer.compress(explicit_le(ds)))
    else:
        header = pydicom.Dataset(ds)
        del header.PixelData
        out.write(packer.compress(explicit_le(header)))
        out.write(packer.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + zero_pixels.to_bytes(4, "little")))
        left = zero_pixels
        while left:
            n = min(left, len(_ZEROS))
            out.write(packer.compress(_ZEROS[:n]))
            left -= n
    out.write(packer.flush())
    return out.getvalue()


def part10(ds: pydicom.Dataset, body: bytes) -> bytes:
    """Preamble, file meta (Deflated Explicit VR Little Endian) and ``body``."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = io.BytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + body


def bomb_image(rows: int, cols: int, **kw: object) -> pydicom.Dataset:
    """A header for a ``rows`` x ``cols`` 16-bit image (its PixelData comes as zeros)."""
    from helpers.dicomfiles import make_image

    ds = make_image(rows=8, cols=8, **kw)  # type: ignore[arg-type]
    ds.Rows, ds.Columns = rows, cols
    return ds
