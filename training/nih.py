"""The NIH ChestX-ray14 layout: its label file, its official split lists, the CheXNet table.

``Data_Entry_2017*.csv`` (plain or ``.gz``) has one row per PNG: ``Image Index`` (the file
name), ``Finding Labels`` (findings joined by ``|``, ``No Finding`` for a normal image),
``Patient ID`` and ``View Position`` (PA / AP), plus columns this module does not need.
``training fit`` reads it directly when ``--labels`` has these columns: the images are found
by file name anywhere under ``--data`` (the NIH archive unpacks into ``images_001/images/``
... folders), the targets are the 14 findings (or ``--label-names``), the patient is
``Patient ID``, so the split is by patient as for DICOM.

``train_val_list.txt`` / ``test_list.txt`` (one image name per line) are the official split:
with ``--split-lists DIR`` the test split is exactly ``test_list.txt`` and train / validation
are split by patient inside ``train_val_list.txt``; without it every split is by patient
(CheXNet's own protocol: 70 / 10 / 20 by patient, ``--split 0.7,0.1,0.2``).

The evaluation table follows Table 1 of Rajpurkar et al. 2017 (CheXNet: one row per
pathology, AUROC on the test split), with the paper's published CheXNet AUROC beside the
run's own.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import FitError
from training.split import SPLITS, PatientSplit, SplitError, patient_split

logger = logging.getLogger(__name__)

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
"""The 14 findings in the order of the CheXNet paper (and of its re-implementations)."""

NO_FINDING = "No Finding"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
SPLIT_LISTS = ("train_val_list.txt", "test_list.txt")
TABLE_FILE = "chexnet_table.md"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

FIT_PRESETS: dict[str, dict[str, Any]] = {
    "chexnet": {
        "preset": "chexnet", "network": "densenet121", "label_names": NIH_LABELS,
        "image_size": 224, "loss": "weighted-bce", "optimizer": "adam", "lr": 1e-3,
        "weight_decay": 0.0, "schedule": "plateau", "warmup_steps": 0, "batch_size": 16,
        "split": (0.7, 0.1, 0.2), "modalities": (),
    },
}  # fmt: skip
"""``training fit --preset``: CheXNet (Rajpurkar et al. 2017, section 3.1): DenseNet121, the
14 findings, 224 px, weighted BCE, Adam (lr 0.001, betas 0.9 / 0.999), LR / 10 each time the
validation loss plateaus, batch 16, 70 / 10 / 20 split by patient. Differences, on
purpose: one grey channel through the node's own preprocessing (the node feeds models
this), ImageNet initialisation only with ``--pretrained`` (torchvision's DenseNet121 file:
no download here), and no horizontal flips (see :mod:`training.datasets`)."""

CHEXNET_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Effusion": 0.8638, "Infiltration": 0.7345,
    "Mass": 0.8676, "Nodule": 0.7802, "Pneumonia": 0.7680, "Pneumothorax": 0.8887,
    "Consolidation": 0.7901, "Edema": 0.8878, "Emphysema": 0.9371, "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062, "Hernia": 0.9164,
}  # fmt: skip
"""CheXNet's published test AUROC per pathology (Rajpurkar et al. 2017, Table 1)."""


@dataclass(frozen=True)
class NihRecord:
    """One row of the label file."""

    image: str
    findings: frozenset[str]
    patient: str
    view: str


def is_nih_layout(path: Path) -> bool:
    """True when the CSV's header has the NIH columns ``Image Index`` and ``Finding Labels``."""
    try:
        with _open_text(Path(path)) as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return False
    names = {h.strip() for h in header}
    return {"Image Index", "Finding Labels"} <= names


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")  # type: ignore[return-value]


def read_labels(path: Path) -> list[NihRecord]:
    """Every row of a ChestX-ray14 label file; a missing column or a repeated image name is
    an error naming it (the row number for the latter)."""
    path = Path(path)
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in fields]
            if missing:
                raise FitError(f'--labels "{path}": not the NIH layout, missing columns {missing}')
            reader.fieldnames = fields
            records = [_record(row) for row in reader]
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise FitError(f'--labels "{path}": cannot be read ({exc})') from exc
    seen: set[str] = set()
    for number, record in enumerate(records, start=2):
        if not record.image or not record.patient:
            raise FitError(f'--labels "{path}" row {number}: empty Image Index or Patient ID')
        if record.image in seen:
            raise FitError(f'--labels "{path}" row {number}: image "{record.image}" repeated')
        seen.add(record.image)
    return records


def _record(row: Mapping[str, str]) -> NihRecord:
    findings = {f.strip() for f in (row["Finding Labels"] or "").split("|") if f.strip()}
    findings.discard(NO_FINDING)
    return NihRecord(row["Image Index"].strip(), frozenset(findings),
                     row["Patient ID"].strip(), (row["View Position"] or "").strip().upper())  # fmt: skip


def targets(records: Sequence[NihRecord], label_names: Sequence[str]) -> np.ndarray:
    """(images, labels) 0/1 matrix; ``No Finding`` rows are all zeros."""
    index = {name: j for j, name in enumerate(label_names)}
    y = np.zeros((len(records), len(label_names)), dtype=np.float32)
    for i, record in enumerate(records):
        for finding in record.findings:
            if finding in index:
                y[i, index[finding]] = 1.0
    return y


def check_label_names(records: Iterable[NihRecord], label_names: Sequence[str]) -> None:
    """Refuse ``--label-names`` the file never uses (a typo would train an all-negative head)."""
    used = set().union(*(r.findings for r in records))
    unknown = [n for n in label_names if n not in used]
    if unknown:
        raise FitError(f"--label-names {unknown} never occur in the NIH labels; "
                       f"findings present: {sorted(used)}")  # fmt: skip


def find_images(root: Path, names: Iterable[str]) -> dict[str, Path]:
    """``Image Index`` -> file under ``root`` (any depth): the image itself, or a DICOM
    conversion with the same stem (``00000001_000.dcm``); names without a file are left out."""
    wanted = set(names)
    by_stem = {Path(name).stem: name for name in wanted}
    found: dict[str, Path] = {}
    for path in sorted(Path(root).rglob("*")):
        suffix = path.suffix.lower()
        if path.name in wanted and suffix in IMAGE_SUFFIXES:
            found.setdefault(path.name, path)
        elif suffix == ".dcm" and path.stem in by_stem:
            found.setdefault(by_stem[path.stem], path)
    return found


# --------------------------------------------------------------------------------------------
# Splits


def read_split_lists(folder: Path) -> tuple[set[str], set[str]]:
    """(train_val names, test names) from ``train_val_list.txt`` and ``test_list.txt``."""
    sets = []
    for name in SPLIT_LISTS:
        path = Path(folder) / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise FitError(f'--split-lists "{folder}": cannot read {name} ({exc})') from exc
        sets.append({line.strip() for line in lines if line.strip()})
    train_val, test = sets
    both = train_val & test
    if both:
        raise FitError(f'--split-lists "{folder}": {len(both)} image(s) in both lists')
    return train_val, test


def split_records(records: Sequence[NihRecord], y: np.ndarray, *, fractions: Sequence[float],
                  seed: int, label_names: Sequence[str],
                  lists: tuple[set[str], set[str]] | None = None) -> PatientSplit:  # fmt: skip
    """Patient-level split; with official ``lists``, test is ``test_list.txt`` and train /
    validation are split by patient inside ``train_val_list.txt`` in the ratio of
    ``fractions``. Images in neither list are left out (logged)."""
    images = [r.image for r in records]
    patients = [r.patient for r in records]
    if lists is None:
        return patient_split(images, patients, y, fractions=fractions, seed=seed,
                             label_names=label_names)  # fmt: skip
    train_val, test = lists
    inner = [i for i, name in enumerate(images) if name in train_val]
    outer = [i for i, name in enumerate(images) if name in test]
    unlisted = len(images) - len(inner) - len(outer)
    if unlisted:
        logger.warning("%d image(s) are in neither split list: left out", unlisted)
    train_f, val_f = float(fractions[0]), float(fractions[1])
    part = patient_split([images[i] for i in inner], [patients[i] for i in inner], y[inner],
                         fractions=(train_f / (train_f + val_f), val_f / (train_f + val_f), 0.0),
                         seed=seed, label_names=label_names)  # fmt: skip
    test_patients = {patients[i] for i in outer}
    crossing = test_patients & set(part.patients)
    if crossing:
        raise SplitError(f"{len(crossing)} patient(s) are in both official lists")
    uids = dict(part.sop_uids, test=[images[i] for i in outer])
    by_patient = {**part.patients, **dict.fromkeys(test_patients, "test")}
    positives = dict(part.positives)
    positives["test"] = {n: int(y[outer, j].sum()) for j, n in enumerate(part.label_names)}
    total = len(inner) + len(outer)
    fractions_out = tuple(len(uids[s]) / total for s in SPLITS)
    result = PatientSplit(by_patient, uids, seed, fractions_out, part.label_names, positives)
    result.check_disjoint()
    return result


# --------------------------------------------------------------------------------------------
# The CheXNet table


def chexnet_table(per_label: Mapping[str, Any], split: str = "test") -> str:
    """Markdown in the layout of CheXNet's Table 1: pathology, this run's AUROC (95 % CI
    when known), CheXNet's published AUROC, the difference. ``per_label`` is the
    ``metrics.json`` ``per_label`` of ``training fit`` (label -> split -> figures)."""
    lines = [f"| Pathology | This run ({split}) | 95 % CI | CheXNet (published) | Difference |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    ours, theirs = [], []
    for name in NIH_LABELS:
        if name not in per_label:
            continue
        auroc = ((per_label[name].get(split) or {}).get("auroc") or {})
        value, lo, hi = auroc.get("value"), auroc.get("lower"), auroc.get("upper")
        published = CHEXNET_AUROC[name]
        ci_text = f"{lo:.4f}-{hi:.4f}" if lo is not None and hi is not None else "—"
        if isinstance(value, int | float) and math.isfinite(value):
            ours.append(value)
            theirs.append(published)
            lines.append(f"| {name} | {value:.4f} | {ci_text} | {published:.4f} | "
                         f"{value - published:+.4f} |")  # fmt: skip
        else:
            lines.append(f"| {name} | n/a | — | {published:.4f} | — |")
    if ours:
        mean, pub = float(np.mean(ours)), float(np.mean(theirs))
        lines.append(f"| **Mean ({len(ours)} labels)** | {mean:.4f} | | {pub:.4f} | "
                     f"{mean - pub:+.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
