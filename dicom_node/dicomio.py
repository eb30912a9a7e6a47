"""Reading DICOM that came from the network: never trusted, never allowed to be loud.

pydicom reports malformed values as warnings whose text can quote the value (a patient
name with a bad character, say). Input is untrusted, so those warnings are suppressed here
and the outcome (readable or not) is what the node records, without values.

At ingest the node reads only the few header attributes it files an instance under, from a
bounded prefix of the data set (:func:`read_file_meta`, :func:`parse_header`): memory does
not grow with what the rest of the file claims.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag

from dicom_node.errors import InvalidInstanceError

# the header the node files an instance under lies before this much of the data set
HEADER_PREFIX_BYTES = 4 * 1024 * 1024
# the last attribute read at ingest: (0020,000E) Series Instance UID
_HEADER_END = Tag(0x0020, 0x000E)
_DEFER = 4096  # larger values in the prefix are skipped, not loaded


@contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings; element values convert lazily, so wrap accesses too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_untrusted(path: str | Path, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread`` with pydicom's value-quoting warnings silenced."""
    with quiet():
        return pydicom.dcmread(path, **kwargs)


def read_file_meta(path: Path) -> tuple[FileMetaDataset, int]:
    """The File Meta Information of a Part 10 file and the offset of its data set."""

    def past_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 2

    try:
        with quiet(), open(path, "rb") as fp:
            read_preamble(fp, False)
            meta = read_dataset(fp, False, True, stop_when=past_meta, defer_size=_DEFER)
            return FileMetaDataset(meta), fp.tell()
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is a reason
        raise InvalidInstanceError(f"file meta unreadable: {type(exc).__name__}") from exc


def parse_header(prefix: bytes, *, implicit_vr: bool, little_endian: bool,
                 complete: bool) -> pydicom.Dataset:
    """Parse the header attributes up to Series Instance UID from a data set prefix.

    ``complete`` says the prefix is the whole data set; otherwise the header must end
    inside it (pydicom returns a value cut at the end of the prefix without complaint).
    """
    reached_end = False

    def past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal reached_end
        reached_end = reached_end or tag > _HEADER_END
        return reached_end

    try:
        with quiet():
            ds = read_dataset(io.BytesIO(prefix), implicit_vr, little_endian,
                              stop_when=past_header, defer_size=_DEFER)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is a reason
        raise InvalidInstanceError(f"header unreadable: {type(exc).__name__}") from exc
    if not (reached_end or complete):
        raise InvalidInstanceError(f"header not within the first {len(prefix)} B of the "
                                   "data set")
    return ds
