"""Reference label files for chest radiographs: classification CSVs, YOLO boxes (the one
YOLO line parser, :func:`parse_yolo_line`) and NIH box CSVs.

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

Matching labels to a DICOM tree is :mod:`ai.reference.matching` (every mismatch kept in a
:class:`~ai.reference.matching.LabelMatch`, nothing dropped silently); indexing the tree and
the one "is this a DICOM file" check are :mod:`ai.reference.dicom_files`.
Reports and logs name SOP Instance UIDs, label-file lines and keys, never patient data.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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
_OUTSIDE_TOLERANCE = 1e-6  # normalised units; YOLO writers round to 6 digits


class LabelError(AnalysisError, ValueError):
    """A label file cannot be read or does not fit the images (names file, line, value)."""


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


def parse_yolo_line(text: str, where: str, classes: Sequence[str] = ()) -> YoloBox:
    """``"C xc yc w h"`` (normalised centre and size) -> :class:`YoloBox`; the one YOLO line
    parser (label files, the box truth of evaluations). ``label`` is the class name from
    ``classes``, None when the index is outside it. :class:`LabelError` names ``where``."""
    text = str(text)
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
            parse_yolo_line(text, f"{where}#{i}", names) for i, text in enumerate(lines)
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
            parse_yolo_line(line.strip(), f"{rel}.txt:{n}", names)
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
