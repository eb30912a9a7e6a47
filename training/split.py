"""Patient-level train / validation / test split, stratified by label prevalence.

Images of one patient are correlated (same anatomy, often the same finding on follow-ups),
so a model that saw a patient in training scores that patient's other images too well. The
split therefore assigns *patients*, never images, and no patient appears in two splits.

Stratification is iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011) lifted
to patients: each patient carries its image count and per-label positive-image counts; the
rarest label is distributed first, each of its patients going to the split that still wants
the most positives of that label (ties: most images still wanted, then a seeded coin), and
patients without any positive fill the splits by image count. Rare labels end up spread in
proportion, which random patient shuffling does not guarantee on small sets.

The result is saved with the run as ``split.json``: patient id -> split and SOP Instance
UIDs per split, with the seed and fractions, so a run (or a later evaluation) can be
repeated on the same images. Patient ids are written there because the split must be
auditable against the exported data; they never go to logs or into a bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import TrainingError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
SPLIT_FILE = "split.json"


class SplitError(TrainingError, ValueError):
    """A split cannot be made or read (bad fractions, too few patients, bad file)."""


@dataclass(frozen=True)
class PatientSplit:
    """Patients and images per split.

    ``patients`` maps patient key -> split name; ``sop_uids`` maps split name -> the SOP
    Instance UIDs of its images (in input order).
    """

    patients: dict[str, str]
    sop_uids: dict[str, list[str]]
    seed: int
    fractions: tuple[float, ...]
    label_names: tuple[str, ...] = ()
    positives: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> n

    def split_of(self, sop_uid: str) -> str | None:
        for name, uids in self.sop_uids.items():
            if sop_uid in uids:
                return name
        return None

    def counts(self) -> dict[str, dict[str, int]]:
        """Images and patients per split (no identifiers)."""
        patients = {name: 0 for name in self.sop_uids}
        for split in self.patients.values():
            patients[split] = patients.get(split, 0) + 1
        return {
            name: {"images": len(uids), "patients": patients.get(name, 0)}
            for name, uids in self.sop_uids.items()
        }

    def check_disjoint(self) -> None:
        """Raise :class:`SplitError` if an image is in two splits (patients are by design)."""
        seen: dict[str, str] = {}
        for name, uids in self.sop_uids.items():
            for uid in uids:
                if uid in seen and seen[uid] != name:
                    raise SplitError(f"SOP Instance {uid} is in splits {seen[uid]} and {name}")
                seen[uid] = name

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "fractions": dict(zip(self.sop_uids, self.fractions, strict=False)),
            "label_names": list(self.label_names),
            "counts": self.counts(),
            "positives": self.positives,
            "patients": dict(sorted(self.patients.items())),
            "sop_instance_uids": self.sop_uids,
        }

    def save(self, path: Path) -> Path:
        """Write ``split.json`` (``path`` may be the run folder or the file)."""
        path = Path(path)
        if path.is_dir():
            path = path / SPLIT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> PatientSplit:
        """Read a ``split.json`` written by :meth:`save`."""
        path = Path(path)
        if path.is_dir():
            path = path / SPLIT_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            fractions = doc.get("fractions", {})
            return cls(
                patients={str(k): str(v) for k, v in doc["patients"].items()},
                sop_uids={str(k): [str(u) for u in v] for k, v in doc["sop_instance_uids"].items()},
                seed=int(doc["seed"]),
                fractions=tuple(float(v) for v in fractions.values()),
                label_names=tuple(doc.get("label_names", ())),
                positives=doc.get("positives", {}),
            )
        except FileNotFoundError as exc:
            raise SplitError(f'split file "{path}" does not exist') from exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SplitError(f'split file "{path}" cannot be read: {exc}') from exc


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or any(f < 0 for f in values) or values[0] <= 0:
        raise SplitError(f"fractions {list(values)} must be three non-negative numbers, train > 0")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise SplitError(f"fractions {list(values)} must sum to 1, not {total:g}")
    return values


def _patient_table(
    patient_keys: Sequence[str], targets: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patients in first-seen order, images per patient, positive images per patient x label)."""
    order: dict[str, int] = {}
    for key in patient_keys:
        order.setdefault(key, len(order))
    counts = np.zeros(len(order), dtype=np.int64)
    positives = np.zeros((len(order), targets.shape[1]), dtype=np.int64)
    rows = np.asarray([order[k] for k in patient_keys])
    np.add.at(counts, rows, 1)
    np.add.at(positives, rows, (targets > 0).astype(np.int64))
    return list(order), counts, positives


def _stratify(
    counts: np.ndarray, positives: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Iterative stratification over patients; returns a split index per patient."""
    n_splits = len(fractions)
    frac = np.asarray(fractions)
    want_images = frac * counts.sum()
    want_labels = frac[:, None] * positives.sum(axis=0)[None, :]
    assigned = np.full(len(counts), -1)
    remaining = positives.copy()
    order = rng.permutation(len(counts))  # seeded tie-breaking and visiting order
    while True:
        open_mask = assigned[order] < 0
        left = remaining[order][open_mask]
        has = left.sum(axis=0)
        if not has.any():
            break
        label = int(np.argmin(np.where(has > 0, has, np.iinfo(np.int64).max)))
        for p in order[open_mask & (remaining[order][:, label] > 0)]:
            score = np.stack([want_labels[:, label], want_images, rng.random(n_splits)], axis=1)
            score[frac == 0] = -np.inf  # an empty split (fraction 0) takes nobody
            target = int(np.lexsort(score.T[::-1])[-1])
            assigned[p] = target
            want_labels[target] -= positives[p]
            want_images[target] -= counts[p]
            remaining[p] = 0
    for p in order[assigned[order] < 0]:  # patients without positives: fill by image count
        score = np.stack([want_images, rng.random(n_splits)], axis=1)
        score[frac == 0] = -np.inf
        target = int(np.lexsort(score.T[::-1])[-1])
        assigned[p] = target
        want_images[target] -= counts[p]
    return assigned


def _ensure_nonempty(assigned: np.ndarray, counts: np.ndarray, fractions: Sequence[float]) -> None:
    """Move one patient into any split that wanted images but got none (tiny data sets)."""
    for split, fraction in enumerate(fractions):
        if fraction <= 0 or (assigned == split).any():
            continue
        sizes = np.bincount(assigned, minlength=len(fractions))
        donor = int(np.argmax(sizes))
        if sizes[donor] < 2:
            raise SplitError("too few patients to fill every split; lower the number of splits")
        candidates = np.flatnonzero(assigned == donor)
        assigned[candidates[np.argmin(counts[candidates])]] = split


def patient_split(
    sop_uids: Sequence[str],
    patient_keys: Sequence[str],
    targets: np.ndarray | Sequence[Sequence[int]],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    label_names: Sequence[str] = (),
) -> PatientSplit:
    """Split images by patient, stratified by their labels, reproducibly from ``seed``.

    Args:
        sop_uids: one per image.
        patient_keys: the patient of each image (DICOM PatientID or a fallback key).
        targets: (images, labels) 0/1 (one-hot for multi-class).
        fractions: train, val, test shares of the images (val or test may be 0).
        seed: same inputs and seed -> same split.
    """
    frac = _check_fractions(fractions)
    y = np.asarray(targets, dtype=np.int64)
    if y.ndim != 2 or len(y) != len(sop_uids) or len(patient_keys) != len(sop_uids):
        raise SplitError(
            f"need one target row and one patient per image: {len(sop_uids)} images, "
            f"{len(patient_keys)} patients, targets of shape {y.shape}"
        )
    if len(set(sop_uids)) != len(sop_uids):
        raise SplitError("SOP Instance UIDs must be unique")
    patients, counts, positives = _patient_table(patient_keys, y)
    needed = sum(1 for f in frac if f > 0)
    if len(patients) < needed:
        raise SplitError(f"{len(patients)} patient(s) cannot fill {needed} splits")
    rng = np.random.default_rng([seed, 0x5B717])
    assigned = _stratify(counts, positives, frac, rng)
    _ensure_nonempty(assigned, counts, frac)
    by_patient = {key: SPLITS[assigned[i]] for i, key in enumerate(patients)}
    uids: dict[str, list[str]] = {name: [] for name in SPLITS}
    for uid, key in zip(sop_uids, patient_keys, strict=True):
        uids[by_patient[key]].append(uid)
    names = tuple(label_names) or tuple(f"label{i}" for i in range(y.shape[1]))
    split_of_image = np.asarray([SPLITS.index(by_patient[k]) for k in patient_keys])
    pos = {
        name: {names[j]: int(y[split_of_image == s, j].sum()) for j in range(y.shape[1])}
        for s, name in enumerate(SPLITS)
    }
    result = PatientSplit(by_patient, uids, seed, frac, names, pos)
    result.check_disjoint()
    logger.info("Patient split (seed %d): %s", seed, result.counts())
    return result


def apply_split(split: PatientSplit, sop_uids: Sequence[str]) -> dict[str, list[int]]:
    """Indexes of ``sop_uids`` per split; images the split does not know raise SplitError."""
    where = {uid: name for name, uids in split.sop_uids.items() for uid in uids}
    out: dict[str, list[int]] = {name: [] for name in split.sop_uids}
    missing = [uid for uid in sop_uids if uid not in where]
    if missing:
        raise SplitError(
            f"{len(missing)} image(s) are not in the saved split (first: sop={missing[0]}); "
            "the data changed since the split was made"
        )
    for i, uid in enumerate(sop_uids):
        out[where[uid]].append(i)
    return out


def prevalence(split: PatientSplit) -> Mapping[str, dict[str, float]]:
    """Positive fraction per label in each split (for checks and the run record)."""
    out: dict[str, dict[str, float]] = {}
    for name, uids in split.sop_uids.items():
        n = max(len(uids), 1)
        out[name] = {label: count / n for label, count in split.positives.get(name, {}).items()}
    return out
