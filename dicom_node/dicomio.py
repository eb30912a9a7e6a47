"""Reading DICOM that came from the network: never trusted, never allowed to be loud.

pydicom reports malformed values as warnings whose text can quote the value (a patient
name with a bad character, say). Input is untrusted, so those warnings are suppressed here
and the outcome (readable or not) is what the node records, without values.

At ingest the node reads only the few header attributes it files an instance under and the
ones the selection rules read, from a bounded prefix of the data set (:func:`read_file_meta`,
:func:`parse_header`): memory does not grow with what the rest of the file claims. That one
parse is the only one on the C-STORE path: the selection attributes it yields
(:func:`selection_attributes`) are stored on the instance row and the study assembler applies
the rules to them without opening the file.

Issue 9 asks for the header "from the received bytes in memory, before the spool write". The
node streams the data set to ``spool/tmp`` as it arrives (:mod:`dicom_node.transport`), so
the bytes are never whole in memory; the first 64 kB of them are kept as they are written
(:class:`dicom_node.spool.Tap`) and the header is parsed from those, once (from a bounded
prefix of the received file only when the header is longer), before the file is moved into
the spool.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from ai.selection import SELECTION_KEYWORDS
from dicom_node.errors import InvalidInstanceError

# the header the node files an instance under lies before this much of the data set
HEADER_PREFIX_BYTES = 4 * 1024 * 1024
# the last attribute read at ingest: (0020,000E) Series Instance UID
_HEADER_END = Tag(0x0020, 0x000E)
_DEFER = 4096  # larger values in the prefix are skipped, not loaded

# What the selection rules (:func:`ai.selection.rejection_reason`) read is stored on the
# instance row at ingest: parsing goes on past the filing header up to the last of them,
# (0054,0220) View Code Sequence
_SELECTION_END = Tag(max(tag_for_keyword(k) or 0 for k in SELECTION_KEYWORDS))

Selection = dict[str, object]  # keyword -> value as JSON holds it; absent: not in the header


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


def read_file_meta(source: Path | bytes) -> tuple[FileMetaDataset, int]:
    """The File Meta Information of a Part 10 file (a path, or its first bytes) and the
    offset of its data set."""

    def past_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 2

    try:
        with quiet(), (io.BytesIO(source) if isinstance(source, bytes)
                       else open(source, "rb")) as fp:
            read_preamble(fp, False)
            meta = read_dataset(fp, False, True, stop_when=past_meta, defer_size=_DEFER)
            return FileMetaDataset(meta), fp.tell()
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is a reason
        raise InvalidInstanceError(f"file meta unreadable: {type(exc).__name__}") from exc


def _parse(prefix: bytes, implicit_vr: bool, little_endian: bool, last: BaseTag,
           highest: list[BaseTag]) -> pydicom.Dataset:
    """Parse up to (not past) the first tag after ``last``; ``highest[0]``: the highest tag
    met so far (kept when the parse raises)."""

    def past(tag: BaseTag, vr: str | None, length: int) -> bool:
        highest[0] = max(highest[0], tag)
        return tag > last

    with quiet():
        return read_dataset(io.BytesIO(prefix), implicit_vr, little_endian, stop_when=past,
                            defer_size=_DEFER)


def parse_header(prefix: bytes, *, implicit_vr: bool, little_endian: bool,
                 complete: bool) -> tuple[pydicom.Dataset, bool]:
    """Parse the header from a data set prefix: up to Series Instance UID, and on to the
    selection attributes (:data:`SELECTION_KEYWORDS`) where they lie in the prefix.

    ``complete`` says the prefix is the whole data set; otherwise the filing header must end
    inside it (pydicom returns a value cut at the end of the prefix without complaint).
    Returns the data set and whether it holds the selection attributes (parsing passed the
    last of them, or read the whole data set). What is accepted is decided on the filing
    header alone, as before the selection attributes were read here: when an element after
    Series Instance UID cannot be parsed, the header is parsed again up to it only (malformed
    input: the one case with a second parse) and the selection attributes are left to the
    assembler's fallback, which reads the file.
    """
    highest = [Tag(0)]
    try:
        ds = _parse(prefix, implicit_vr, little_endian, _SELECTION_END, highest)
        with_selection = complete or highest[0] > _SELECTION_END
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser error is a reason
        if highest[0] <= _HEADER_END:  # the filing header itself: unreadable, as ever
            raise InvalidInstanceError(f"header unreadable: {type(exc).__name__}") from exc
        highest = [Tag(0)]
        try:
            ds = _parse(prefix, implicit_vr, little_endian, _HEADER_END, highest)
        except Exception as again:  # noqa: BLE001 - as above
            raise InvalidInstanceError(f"header unreadable: {type(again).__name__}") from again
        with_selection = False
    if not (highest[0] > _HEADER_END or complete):
        raise InvalidInstanceError(f"header not within the first {len(prefix)} B of the "
                                   "data set")
    return ds, with_selection


def selection_attributes(ds: pydicom.Dataset) -> Selection | None:
    """The selection attributes of ``ds`` as plain JSON values (the row's ``selection``
    column), or None when one cannot be read as such (the assembler then reads the file)."""

    def plain(value: object) -> object:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, pydicom.Dataset):  # a sequence item (ViewCodeSequence's codes)
            return {e.keyword: plain(e.value) for e in value if e.keyword}
        if isinstance(value, (MultiValue, Sequence, list)):
            return [plain(v) for v in value]
        for kind in (int, float, str):  # IS/DS/UID are subclasses: keep the plain value
            if isinstance(value, kind):
                return kind(value)
        raise TypeError(type(value).__name__)

    try:
        with quiet():
            return {k: plain(ds.get(k)) for k in SELECTION_KEYWORDS if k in ds}
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert: the file decides later
        return None


def dump_selection(selection: Selection | None) -> str | None:
    return None if selection is None else json.dumps(selection, separators=(",", ":"))


def load_selection(text: str | None) -> Selection | None:
    return None if text is None else json.loads(text)


class SopReference(Protocol):
    """Anything naming one stored object: an output, a delivery, a prior result."""

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def sop_instance_uid(self) -> str: ...


def referenced_sops(objects: Iterable[SopReference]) -> list[pydicom.Dataset]:
    """Referenced SOP Sequence items (class + instance UID) for ``objects``: what a storage
    commitment request and a superseding SR's predecessor references both list."""
    items = []
    for obj in objects:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = obj.sop_class_uid
        item.ReferencedSOPInstanceUID = obj.sop_instance_uid
        items.append(item)
    return items
