"""Reference labels for chest radiographs, and matching them to an exported DICOM tree.

Shared by ``training`` (fit, evaluate) and the node's scheduled evaluation jobs, so it lives
in ``ai`` and never imports ``training`` or ``dicom_node``.

Formats:

* Classification CSV keyed by SOP Instance UID, a relative file path or a Study Instance UID
  (a study's labels apply to each of its images), with one 0/1 column per label
  (multi-label) or a single ``label`` column holding class names (multi-class).
* YOLO boxes: a folder of per-image ``.txt`` files, or a JSON map ``file -> ["C xc yc w h"]``
  (normalised centre/size; an empty list marks a negative image).
* NIH ChestX-ray14 style box CSV: ``Image Index, Finding Label`` and a pixel box
  ``x, y, w, h``. The real file's header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``:
  the bracketed name splits into four columns and three unnamed ones trail, so the box is
  read positionally after the ``Bbox`` column.

Every mismatch between labels and images (labels without images, images without labels,
unknown classes, boxes outside the image, unreadable files, duplicates) is kept in a
:class:`LabelMatch` with a readable :meth:`LabelMatch.report`; nothing is dropped silently.
Reports and logs name SOP Instance UIDs, label-file lines and keys, never patient data.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, overload

import pydicom
from pydicom.errors import InvalidDicomError

from ai.codes import normalise_label
from ai.types import AnalysisError

logger = logging.getLogger(__name__)

KEY_KINDS = ("sop", "path", "study")
"""How a classification CSV names its images."""

_KEY_ALIASES: dict[str, tuple[str, ...]] = {  # normalised header names, preferred first
    "sop": ("sopinstanceuid", "sopuid", "sop", "instanceuid"),
    "path": ("path", "relpath", "relativepath", "file", "filename", "filepath", "image"),
    "study": ("studyinstanceuid", "studyuid", "study"),
}
_RESERVED = {  # columns that describe the image, never a label
    *(alias for aliases in _KEY_ALIASES.values() for alias in aliases),
    "patientid", "patient", "seriesinstanceuid", "seriesuid", "view", "viewposition",
    "modality", "split", "fold", "accessionnumber", "sex", "age",
}  # fmt: skip
_MULTICLASS_COLUMN = "label"
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
_OUTSIDE_TOLERANCE = 1e-6  # normalised units; YOLO writers round to 6 digits
_REPORT_LIMIT = 20  # entries per section in report(); the counts are always complete


class LabelError(AnalysisError, ValueError):
    """A label file cannot be read or does not fit the images (names file, line, value)."""


class LabelMismatchError(LabelError):
    """Strict matching found mismatches; ``match`` holds them all."""

    def __init__(self, match: LabelMatch) -> None:
        super().__init__(f"labels and images do not match:\n{match.report()}")
        self.match = match


def _norm_header(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def normalise_path(value: str) -> str:
    """A relative path as label files write it -> POSIX form without ``./`` (case kept)."""
    text = value.strip().replace("\\", "/")
    parts = [p for p in PurePosixPath(text).parts if p not in (".", "/")]
    return "/".join(parts)


# --------------------------------------------------------------------------------------------
# Classification labels


@dataclass(frozen=True)
class LabelRecord:
    """One row of a classification CSV.

    ``targets`` holds one 0/1 value per label (one-hot for multi-class); ``class_name`` is the
    raw multi-class value (None for multi-label) and may name an unknown class, in which case
    ``targets`` is all zero and :func:`match_labels` reports it.
    """

    key: str
    line: int
    targets: tuple[int, ...]
    class_name: str | None = None
    patient_id: str | None = None

    @property
    def known(self) -> bool:
        return any(self.targets) or self.class_name is None


@dataclass
class ClassificationLabels:
    """A parsed classification label file."""

    source: Path
    key: str  # one of KEY_KINDS
    key_column: str
    label_names: tuple[str, ...]
    multi_label: bool
    records: dict[str, LabelRecord]
    duplicates: list[str] = field(default_factory=list)  # keys listed twice with equal labels

    @property
    def unknown_classes(self) -> list[LabelRecord]:
        """Multi-class rows whose value is not one of :attr:`label_names`."""
        return [r for r in self.records.values() if not r.known]

    def positives(self) -> dict[str, int]:
        """Positive rows per label (rows, not images: a study row counts once)."""
        counts = [0] * len(self.label_names)
        for record in self.records.values():
            for i, value in enumerate(record.targets):
                counts[i] += value
        return dict(zip(self.label_names, counts, strict=True))


def _detect_key(fieldnames: Sequence[str], key: str) -> tuple[str, str]:
    by_norm = {_norm_header(name): name for name in fieldnames}
    kinds = KEY_KINDS if key == "auto" else (key,)
    if key != "auto" and key not in KEY_KINDS:
        raise LabelError(f'labels key "{key}" must be one of auto, {", ".join(KEY_KINDS)}')
    for kind in kinds:
        for alias in _KEY_ALIASES[kind]:
            if alias in by_norm:
                return kind, by_norm[alias]
    wanted = ", ".join(_KEY_ALIASES[k][0] for k in kinds)
    raise LabelError(f"no key column ({wanted}) in the header {list(fieldnames)}")


def _parse_binary(value: str, where: str, column: str) -> int:
    text = value.strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise LabelError(
        f'{where}: column "{column}" has value "{value}"; label columns hold 0 or 1 '
        "(pass label names to choose the label columns)"
    )


def _label_columns(
    fieldnames: Sequence[str], label_names: Sequence[str] | None, source: Path
) -> tuple[list[str], bool]:
    """(CSV columns holding labels, multi_label)."""
    by_norm = {_norm_header(name): name for name in fieldnames}
    if _MULTICLASS_COLUMN in by_norm:
        return [by_norm[_MULTICLASS_COLUMN]], False
    if label_names:
        by_label = {normalise_label(name): name for name in fieldnames}
        missing = [n for n in label_names if normalise_label(n) not in by_label]
        if missing:
            raise LabelError(
                f"{source}: label columns {missing} not in the header {list(fieldnames)}"
            )
        return [by_label[normalise_label(n)] for n in label_names], True
    columns = [n for n in fieldnames if n and _norm_header(n) not in _RESERVED]
    if not columns:
        raise LabelError(f"{source}: no label columns in the header {list(fieldnames)}")
    return columns, True


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fieldnames = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = fieldnames
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError as exc:
        raise LabelError(f'label file "{path}" does not exist') from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f'label file "{path}" cannot be read: {exc}') from exc
    if not fieldnames:
        raise LabelError(f'label file "{path}" is empty (no header)')
    return fieldnames, rows


@dataclass(frozen=True)
class _Layout:
    """Where a classification CSV keeps its key, labels and patient."""

    source: Path
    kind: str
    key_column: str
    columns: tuple[str, ...]
    multi_label: bool
    names: tuple[str, ...]
    patient_column: str | None

    def parse(self, row: Mapping[str, str | None], line: int) -> LabelRecord:
        where = f"{self.source}, line {line}"
        raw_key = (row.get(self.key_column) or "").strip()
        if not raw_key:
            raise LabelError(f'{where}: empty key column "{self.key_column}"')
        key = normalise_path(raw_key) if self.kind == "path" else raw_key
        patient = (row.get(self.patient_column) or "").strip() if self.patient_column else ""
        if self.multi_label:
            targets = tuple(_parse_binary(row.get(c) or "", where, c) for c in self.columns)
            return LabelRecord(key, line, targets, None, patient or None)
        value = (row.get(self.columns[0]) or "").strip()
        if not value:
            raise LabelError(f'{where}: empty "{self.columns[0]}" value')
        wanted = normalise_label(value)
        onehot = tuple(int(normalise_label(n) == wanted) for n in self.names)
        return LabelRecord(key, line, onehot, value, patient or None)


def read_classification_labels(
    csv_path: Path | str,
    label_names: Sequence[str] | None = None,
    *,
    key: str = "auto",
) -> ClassificationLabels:
    """Read a classification CSV.

    Args:
        csv_path: the CSV file (UTF-8, header row).
        label_names: multi-label: the label columns to use, in this order (default: every
            column that is not a key or image attribute); multi-class: the class list in
            output order (default: the sorted values of the ``label`` column). Matched
            case- and spacing-insensitively (``"Pleural Effusion"`` = ``pleural_effusion``).
        key: ``"auto"`` (SOP UID, then path, then study UID: the first present in the
            header), or ``"sop"``, ``"path"``, ``"study"``.

    Raises:
        LabelError: unreadable file, no key column, a non-0/1 label value, an empty key,
            or the same key twice with different labels.
    """
    source = Path(csv_path)
    fieldnames, rows = _read_csv(source)
    kind, key_column = _detect_key(fieldnames, key)
    columns, multi_label = _label_columns(fieldnames, label_names, source)
    if label_names:
        names = tuple(label_names)
    elif multi_label:
        names = tuple(columns)
    else:
        names = tuple(sorted({(row[columns[0]] or "").strip() for _, row in rows} - {""}))
    if not names:
        raise LabelError(f"{source}: no labels found")
    patient_column = {_norm_header(n): n for n in fieldnames}.get("patientid")
    layout = _Layout(source, kind, key_column, tuple(columns), multi_label, names, patient_column)
    records: dict[str, LabelRecord] = {}
    duplicates: list[str] = []
    for line, row in rows:
        record = layout.parse(row, line)
        previous = records.setdefault(record.key, record)
        if previous is record:
            continue
        if (previous.targets, previous.class_name) != (record.targets, record.class_name):
            raise LabelError(f'{source}: key "{record.key}" on lines {previous.line} and '
                             f"{line} has different labels")  # fmt: skip
        duplicates.append(record.key)
    if not records:
        raise LabelError(f"{source}: no label rows")
    logger.info("Read %d label rows (%s-keyed, %d labels) from %s",
                len(records), kind, len(names), source.name)  # fmt: skip
    return ClassificationLabels(source, kind, key_column, names, multi_label, records, duplicates)


# --------------------------------------------------------------------------------------------
# Boxes


@dataclass(frozen=True)
class YoloBox:
    """A YOLO box: class index and normalised centre/size; ``label`` None = unknown class."""

    class_index: int
    label: str | None
    xc: float
    yc: float
    w: float
    h: float
    source: str = ""  # "file:line" for reports

    def outside(self, tolerance: float = _OUTSIDE_TOLERANCE) -> bool:
        """True when the box leaves the unit square or has no area."""
        x0, x1 = self.xc - self.w / 2, self.xc + self.w / 2
        y0, y1 = self.yc - self.h / 2, self.yc + self.h / 2
        return (
            self.w <= 0 or self.h <= 0 or x0 < -tolerance or y0 < -tolerance
            or x1 > 1 + tolerance or y1 > 1 + tolerance
        )  # fmt: skip

    def to_pixels(self, rows: int, columns: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in source pixel-edge coordinates."""
        return (
            (self.xc - self.w / 2) * columns,
            (self.yc - self.h / 2) * rows,
            (self.xc + self.w / 2) * columns,
            (self.yc + self.h / 2) * rows,
        )


@dataclass(frozen=True)
class PixelBox:
    """An NIH-style box: finding label and ``x, y, w, h`` in source pixels."""

    label: str
    x: float
    y: float
    w: float
    h: float
    source: str = ""

    def outside(self, rows: int, columns: int, tolerance: float = 0.5) -> bool:
        return (
            self.w <= 0 or self.h <= 0 or self.x < -tolerance or self.y < -tolerance
            or self.x + self.w > columns + tolerance or self.y + self.h > rows + tolerance
        )  # fmt: skip


def read_classes(classes: Sequence[str] | Path | str) -> list[str]:
    """A class list, or the path of a ``classes.txt`` file (one name per line)."""
    if isinstance(classes, str | Path):
        try:
            lines = Path(classes).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LabelError(f'classes file "{classes}" cannot be read: {exc}') from exc
        return [line.strip() for line in lines if line.strip()]
    return [str(c) for c in classes]


def _yolo_line(text: str, where: str, classes: Sequence[str]) -> YoloBox:
    parts = text.split()
    if len(parts) != 5:
        raise LabelError(f'{where}: "{text}" is not "class xc yc w h"')
    try:
        cls = int(parts[0])
        xc, yc, w, h = (float(p) for p in parts[1:])
    except ValueError:
        raise LabelError(f'{where}: "{text}" is not "class xc yc w h" (numbers)') from None
    if not all(math.isfinite(v) for v in (xc, yc, w, h)):
        raise LabelError(f'{where}: "{text}" has a non-finite coordinate')
    label = classes[cls] if 0 <= cls < len(classes) else None
    return YoloBox(cls, label, xc, yc, w, h, where)


def read_yolo_labels(
    path_or_dir: Path | str, classes: Sequence[str] | Path | str
) -> dict[str, list[YoloBox]]:
    """YOLO boxes keyed by image (relative path as written; per-image files: path without
    ``.txt``). An empty list marks a negative image. Class indexes outside ``classes`` give
    boxes with ``label=None`` (reported by :func:`match_labels`)."""
    names = read_classes(classes)
    path = Path(path_or_dir)
    if path.is_dir():
        return _read_yolo_dir(path, names)
    if not path.is_file():
        raise LabelError(f'YOLO labels "{path}" do not exist')
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f'YOLO label map "{path}" cannot be read as JSON: {exc}') from exc
    if not isinstance(doc, dict):
        raise LabelError(f'YOLO label map "{path}" must be a JSON object file -> [lines]')
    out: dict[str, list[YoloBox]] = {}
    for name, lines in doc.items():
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise LabelError(f'{path}: entry "{name}" must be a list of "class xc yc w h" strings')
        where = f"{path.name}[{name}]"
        out[normalise_path(name)] = [
            _yolo_line(text, f"{where}#{i}", names) for i, text in enumerate(lines)
        ]
    return out


def _read_yolo_dir(root: Path, names: Sequence[str]) -> dict[str, list[YoloBox]]:
    out: dict[str, list[YoloBox]] = {}
    for txt in sorted(root.rglob("*.txt")):
        if txt.name == "classes.txt":
            continue
        rel = txt.relative_to(root).with_suffix("").as_posix()
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LabelError(f'YOLO label file "{txt}" cannot be read: {exc}') from exc
        out[rel] = [
            _yolo_line(line.strip(), f"{rel}.txt:{n}", names)
            for n, line in enumerate(lines, 1)
            if line.strip()
        ]
    if not out:
        raise LabelError(f'YOLO label folder "{root}" holds no .txt files')
    return out


def _nih_box_columns(fieldnames: Sequence[str], source: Path) -> tuple[int, int, list[int]]:
    norm = [_norm_header(n) for n in fieldnames]
    try:
        image_col, label_col = norm.index("imageindex"), norm.index("findinglabel")
    except ValueError:
        raise LabelError(
            f"{source}: NIH box CSV needs Image Index and Finding Label columns, got {list(fieldnames)}"
        ) from None
    if all(k in norm for k in ("x", "y", "w", "h")):
        return image_col, label_col, [norm.index(k) for k in ("x", "y", "w", "h")]
    bbox = next((i for i, n in enumerate(norm) if n.startswith("bbox")), None)
    if bbox is None:
        raise LabelError(f"{source}: NIH box CSV needs x, y, w, h or Bbox [x,y,w,h] columns")
    return image_col, label_col, [bbox, bbox + 1, bbox + 2, bbox + 3]


def read_nih_boxes(csv_path: Path | str) -> dict[str, list[PixelBox]]:
    """NIH-style boxes keyed by ``Image Index`` (a file name), in source pixels.

    Accepts the real ``BBox_List_2017.csv`` header (``Bbox [x,y,w,h]`` spread over four
    columns, trailing unnamed columns), plain ``x, y, w, h`` headers, and a single quoted
    ``"[x, y, w, h]"`` field.
    """
    source = Path(csv_path)
    try:
        with source.open(newline="", encoding="utf-8-sig") as fh:
            table = list(csv.reader(fh))
    except FileNotFoundError as exc:
        raise LabelError(f'NIH box file "{source}" does not exist') from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f'NIH box file "{source}" cannot be read: {exc}') from exc
    if not table:
        raise LabelError(f'NIH box file "{source}" is empty')
    image_col, label_col, box_cols = _nih_box_columns([c.strip() for c in table[0]], source)
    out: dict[str, list[PixelBox]] = defaultdict(list)
    for line, row in enumerate(table[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{source.name}:{line}"
        values = _nih_numbers(row, box_cols, where)
        name = normalise_path(row[image_col]) if image_col < len(row) else ""
        label = row[label_col].strip() if label_col < len(row) else ""
        if not name or not label:
            raise LabelError(f"{where}: empty Image Index or Finding Label")
        out[name].append(PixelBox(label, *values, source=where))
    return dict(out)


def _nih_numbers(row: Sequence[str], cols: Sequence[int], where: str) -> tuple[float, ...]:
    cells = [row[c].strip() for c in cols if c < len(row)]
    if len(cells) < 4 or not all(cells):  # maybe one "[x, y, w, h]" field
        cells = re.findall(r"[-+0-9.eE]+", row[cols[0]]) if cols[0] < len(row) else []
    try:
        values = tuple(float(c) for c in cells[:4])
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise LabelError(f"{where}: box {cells} is not four numbers x, y, w, h")
    return values


# --------------------------------------------------------------------------------------------
# DICOM tree index


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


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return path.suffix.lower() in _DICOM_SUFFIXES
    if path.name.upper() == "DICOMDIR":  # a media directory, not an instance
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom", ".dic")


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
            if not _looks_like_dicom(path):
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


# --------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MatchedImage:
    """An image with its labels: classification ``targets`` and/or detection ``boxes``.

    Boxes are ``(label_index, x0, y0, x1, y1)`` in source pixels; only known classes inside
    the image are kept (the others are reported). ``label_key`` is the label file's key.
    """

    image: IndexedImage
    label_key: str
    targets: tuple[int, ...] = ()
    boxes: tuple[tuple[int, float, float, float, float], ...] = ()
    line: int = 0
    label_patient_id: str | None = None

    @property
    def patient_key(self) -> str:
        """Grouping key for patient-level splits: DICOM PatientID, the label file's
        patient_id, or (neither present) the study, so each study is its own patient."""
        return (
            self.image.patient_id
            or self.label_patient_id
            or f"study:{self.image.study_instance_uid or self.image.sop_instance_uid}"
        )


@dataclass
class LabelMatch:
    """The outcome of matching labels to an index: matched pairs and every mismatch."""

    label_names: tuple[str, ...]
    matched: list[MatchedImage] = field(default_factory=list)
    labels_without_images: list[str] = field(default_factory=list)
    images_without_labels: list[IndexedImage] = field(default_factory=list)
    unknown_classes: list[str] = field(default_factory=list)
    boxes_outside: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    duplicate_images: list[tuple[str, str]] = field(default_factory=list)
    duplicate_labels: list[str] = field(default_factory=list)
    non_images: list[tuple[str, str]] = field(default_factory=list)  # notes, not mismatches
    multi_label: bool = True
    key: str = ""

    @property
    def problems(self) -> dict[str, int]:
        """Counts of each kind of mismatch (zero counts omitted). Identical duplicate label
        rows are a note in the report, not a mismatch (a file keyed by study but written per
        image lists each study once per image)."""
        counts = {
            "labels without images": len(self.labels_without_images),
            "images without labels": len(self.images_without_labels),
            "unknown classes": len(self.unknown_classes),
            "boxes outside the image": len(self.boxes_outside),
            "ambiguous keys": len(self.ambiguous),
            "unreadable files": len(self.unreadable),
            "duplicate images": len(self.duplicate_images),
        }
        return {k: v for k, v in counts.items() if v}

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Counts only (no identifiers): for run configs and logs."""
        notes = {"duplicate label rows": len(self.duplicate_labels),
                 "non-image objects": len(self.non_images)}  # fmt: skip
        notes = {k: v for k, v in notes.items() if v}
        return {"matched": len(self.matched), "key": self.key, **self.problems, **notes}

    def report(self, limit: int = _REPORT_LIMIT) -> str:
        """A readable report: counts, then up to ``limit`` examples of each mismatch."""
        lines = [f"matched images: {len(self.matched)} (labels keyed by {self.key or 'file'})"]
        sections: list[tuple[str, Sequence[str]]] = [
            ("labels without images", self.labels_without_images),
            ("images without labels",
             [f"sop={im.sop_instance_uid} ({im.relpath})" for im in self.images_without_labels]),
            ("unknown classes", self.unknown_classes),
            ("boxes outside the image", self.boxes_outside),
            ("ambiguous keys", self.ambiguous),
            ("unreadable files", [f"{rel}: {why}" for rel, why in self.unreadable]),
            ("duplicate images (same SOP Instance UID)",
             [f"{rel} (sop={uid})" for rel, uid in self.duplicate_images]),
            ("duplicate label rows (identical, used once)", self.duplicate_labels),
            ("non-image objects (SR, PR, KO, ...; not used)",
             [f"{rel} ({modality or 'no modality'})" for rel, modality in self.non_images]),
        ]  # fmt: skip
        for title, items in sections:
            if not items:
                continue
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  - {item}" for item in list(items)[:limit])
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
        if self.ok:
            lines.append("no mismatches")
        return "\n".join(lines)

    def check(self, strict: bool) -> LabelMatch:
        """Strict: raise :class:`LabelMismatchError` on any mismatch; lenient: log counts."""
        if self.problems and strict:
            raise LabelMismatchError(self)
        if self.problems:
            logger.warning("Label matching: %d matched; mismatches %s", len(self.matched),
                           self.problems)  # fmt: skip
        if not self.matched:
            raise LabelError(f"no image matched a label:\n{self.report()}")
        return self


BoxLabels = Mapping[str, Sequence[YoloBox]] | Mapping[str, Sequence[PixelBox]]


def match_labels(
    index: DicomIndex | Sequence[IndexedImage],
    labels: ClassificationLabels | BoxLabels,
    *,
    classes: Sequence[str] | None = None,
    strict: bool = False,
) -> LabelMatch:
    """Pair images with their labels and report every mismatch.

    Args:
        index: from :func:`index_dicom_tree` (its unreadable files are reported too).
        labels: classification labels, or a box map from :func:`read_yolo_labels` /
            :func:`read_nih_boxes` (keys: relative paths or file names, matched against the
            image's relative path, then with the suffix stripped, then by file name stem).
        classes: box label names (NIH boxes naming others are unknown classes; default:
            the YOLO boxes' own class list, or the NIH labels found).
        strict: raise :class:`LabelMismatchError` when anything does not match.
    """
    images = list(index)
    if isinstance(labels, ClassificationLabels):
        match = _match_classification(images, labels)
    else:
        match = _match_boxes(images, labels, classes)
    if isinstance(index, DicomIndex):
        match.unreadable = list(index.unreadable)
        match.duplicate_images = list(index.duplicates)
        match.non_images = list(index.non_images)
    return match.check(strict) if strict else match


def _match_classification(images: list[IndexedImage], labels: ClassificationLabels) -> LabelMatch:
    match = LabelMatch(labels.label_names, multi_label=labels.multi_label, key=labels.key)
    match.duplicate_labels = [f'key "{k}"' for k in labels.duplicates]
    attr = {"sop": "sop_instance_uid", "path": "relpath", "study": "study_instance_uid"}
    used: set[str] = set()
    for image in images:
        key = getattr(image, attr[labels.key])
        record = labels.records.get(key)
        if record is None:
            match.images_without_labels.append(image)
            continue
        used.add(key)
        if not record.known:
            match.unknown_classes.append(
                f'line {record.line}: class "{record.class_name}" is not one of '
                f"{list(labels.label_names)} (sop={image.sop_instance_uid})"
            )
            continue
        match.matched.append(
            MatchedImage(
                image, key, record.targets, line=record.line, label_patient_id=record.patient_id
            )  # fmt: skip
        )
    match.labels_without_images = [
        f'line {r.line}: {labels.key} "{k}"' for k, r in labels.records.items() if k not in used
    ]
    return match


def _image_lookup(images: Iterable[IndexedImage]) -> tuple[dict[str, list[IndexedImage]], ...]:
    exact: dict[str, list[IndexedImage]] = defaultdict(list)
    nosuffix: dict[str, list[IndexedImage]] = defaultdict(list)
    stem: dict[str, list[IndexedImage]] = defaultdict(list)
    for image in images:
        rel = PurePosixPath(image.relpath)
        exact[image.relpath].append(image)
        nosuffix[str(rel.with_suffix(""))].append(image)
        stem[rel.stem].append(image)
    return exact, nosuffix, stem


def _find_image(key: str, lookups: tuple[dict[str, list[IndexedImage]], ...]) -> list[IndexedImage]:
    exact, nosuffix, stem = lookups
    rel = PurePosixPath(key)
    for table, probe in ((exact, key), (nosuffix, str(rel.with_suffix(""))),
                         (nosuffix, key), (stem, rel.stem)):  # fmt: skip
        found = table.get(probe)
        if found:
            return found
    return []


def _box_names(labels: BoxLabels, classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is not None:
        return tuple(classes)
    names: list[str] = []
    for boxes in labels.values():
        for box in boxes:
            label = box.label
            if label is not None and label not in names:
                names.append(label)
    return tuple(names)


def _match_boxes(
    images: list[IndexedImage], labels: BoxLabels, classes: Sequence[str] | None
) -> LabelMatch:
    names = _box_names(labels, classes)
    index = {normalise_label(n): i for i, n in enumerate(names)}
    match = LabelMatch(names, key="file")
    lookups = _image_lookup(images)
    used: set[str] = set()
    for key, boxes in labels.items():
        found = _find_image(key, lookups)
        if not found:
            match.labels_without_images.append(f'file "{key}" ({len(boxes)} boxes)')
            continue
        if len(found) > 1:
            match.ambiguous.append(
                f'file "{key}" fits {len(found)} images: '
                + ", ".join(f"sop={im.sop_instance_uid}" for im in found)
            )
            continue
        image = found[0]
        used.add(image.sop_instance_uid)
        kept = [_check_box(box, image, index, match) for box in boxes]
        targets = [0] * len(names)
        for box in kept:
            if box is not None:
                targets[box[0]] = 1
        match.matched.append(
            MatchedImage(image, key, tuple(targets), tuple(b for b in kept if b is not None))
        )
    match.images_without_labels = [im for im in images if im.sop_instance_uid not in used]
    return match


def _check_box(
    box: YoloBox | PixelBox, image: IndexedImage, index: Mapping[str, int], match: LabelMatch
) -> tuple[int, float, float, float, float] | None:
    position = index.get(normalise_label(box.label)) if box.label is not None else None
    if position is None:
        what = (
            box.label
            if box.label is not None
            else f"class index {getattr(box, 'class_index', '?')}"
        )
        match.unknown_classes.append(f"{box.source}: {what} (sop={image.sop_instance_uid})")
        return None
    if isinstance(box, YoloBox):
        outside = box.outside()
        x0, y0, x1, y1 = box.to_pixels(image.rows, image.cols)
    else:
        outside = box.outside(image.rows, image.cols)
        x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
    if outside:
        match.boxes_outside.append(
            f"{box.source}: {box.label} box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) px outside "
            f"{image.cols} x {image.rows} (sop={image.sop_instance_uid})"
        )
        return None
    return position, x0, y0, x1, y1
