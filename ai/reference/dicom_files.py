"""DICOM files of a reference set or a labelled tree: the one "is this a DICOM file" check
(:func:`looks_like_dicom`) and the header index (:func:`index_dicom_tree`) labels are matched
against. Split from :mod:`ai.reference.labels` (the label files) to keep each module to one
concept; the node's reference evaluation and ``training`` both use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import pydicom
from pydicom.errors import InvalidDicomError

from ai.reference.labels import LabelError

logger = logging.getLogger(__name__)

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})


@dataclass(frozen=True)
class IndexedImage:
    """Header facts of one DICOM file (read with ``stop_before_pixels``).

    ``patient_id`` is kept for patient-level splits only; never log it.
    """

    path: Path
    relpath: str  # POSIX, relative to the indexed root
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = field(repr=False)
    view: str
    rows: int
    cols: int
    modality: str


@dataclass
class DicomIndex(Sequence[IndexedImage]):
    """The readable images of a tree (a sequence), plus what could not be read."""

    root: Path
    images: list[IndexedImage] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (relpath, sop uid)
    non_images: list[tuple[str, str]] = field(default_factory=list)  # (relpath, modality)
    skipped: int = 0  # files that are plainly not DICOM (labels, caches, readme, DICOMDIR)

    @overload
    def __getitem__(self, i: int) -> IndexedImage: ...
    @overload
    def __getitem__(self, i: slice) -> list[IndexedImage]: ...
    def __getitem__(self, i: int | slice) -> IndexedImage | list[IndexedImage]:
        return self.images[i]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[IndexedImage]:
        return iter(self.images)


def looks_like_dicom(path: Path) -> bool:
    """Whether ``path`` should be read as a DICOM instance: the one check for reference sets
    and labelled trees (the node's evaluation jobs, ``training``).

    A ``DICM`` preamble or a DICOM suffix (``.dcm``, ``.dicom``, ``.dic``) says yes; a
    ``DICOMDIR`` (a media directory, not an instance) says no; a file that cannot be opened
    counts when its suffix is a DICOM one or empty, so the caller reports it as unreadable
    instead of skipping it silently.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return path.suffix.lower() in _DICOM_SUFFIXES | {""}
    if path.name.upper() == "DICOMDIR":
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES


def _index_one(path: Path, rel: str) -> IndexedImage:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop:
        raise ValueError("no SOP Instance UID")
    return IndexedImage(
        path=path,
        relpath=rel,
        sop_instance_uid=sop,
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        view=str(ds.get("ViewPosition", "") or "").strip().upper(),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
    )


def index_dicom_tree(root: Path | str, *, progress: Any = None) -> DicomIndex:
    """Index every DICOM file under ``root`` from its header (pixels are not read).

    Files with a DICOM preamble or a DICOM-like suffix that fail to parse, or lack a SOP
    Instance UID, are listed in ``unreadable``; a second file with an already seen SOP
    Instance UID in ``duplicates``; objects without an image (SR, presentation states, key
    object notes: no Rows / Columns) in ``non_images``. Other files (CSV, JSON, caches,
    DICOMDIR) count as ``skipped``.

    Args:
        progress: optional callable called with 1 per file examined (e.g. ``tqdm.update``).
    """
    root = Path(root)
    if not root.is_dir():
        raise LabelError(f'DICOM folder "{root}" does not exist or is not a folder')
    index = DicomIndex(root)
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if progress is not None:
                progress(1)
            if not looks_like_dicom(path):
                index.skipped += 1
                continue
            try:
                image = _index_one(path, rel)
            except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError,
                    KeyError, EOFError) as exc:  # fmt: skip
                index.unreadable.append((rel, f"{type(exc).__name__}: {exc}"[:200]))
                continue
            if image.sop_instance_uid in seen:
                index.duplicates.append((rel, image.sop_instance_uid))
                continue
            if image.rows <= 0 or image.cols <= 0:
                index.non_images.append((rel, image.modality))
                continue
            seen[image.sop_instance_uid] = rel
            index.images.append(image)
    logger.info("Indexed %d DICOM images under %s (%d unreadable, %d duplicate, %d non-image, "
                "%d skipped)", len(index.images), root, len(index.unreadable),
                len(index.duplicates), len(index.non_images), index.skipped)  # fmt: skip
    return index
