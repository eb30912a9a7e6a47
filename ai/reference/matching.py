"""Matching labels to the images of a DICOM tree, with every mismatch kept: labels without
images, images without labels, unknown classes, boxes outside the image, unreadable files and
duplicates end in a :class:`LabelMatch` with a readable report, never dropped silently.

Split from :mod:`ai.reference.labels` (reading label files) and
:mod:`ai.reference.dicom_files` (indexing the tree) so each module holds one concept.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ai.codes import normalise_label
from ai.reference.dicom_files import DicomIndex, IndexedImage
from ai.reference.labels import ClassificationLabels, LabelError, PixelBox, YoloBox

logger = logging.getLogger(__name__)

_REPORT_LIMIT = 20  # entries per section in report(); the counts are always complete


class LabelMismatchError(LabelError):
    """Strict matching found mismatches; ``match`` holds them all."""

    def __init__(self, match: LabelMatch) -> None:
        super().__init__(f"labels and images do not match:\n{match.report()}")
        self.match = match



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
