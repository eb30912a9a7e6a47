"""Patient-level split: no patient in two splits, stratified, reproducible, saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.split import PatientSplit, SplitError, apply_split, patient_split, prevalence


def _cohort(
    seed: int = 0, patients: int = 300, labels: int = 4
) -> tuple[list[str], list[str], np.ndarray]:
    """Patients with 1-4 images; per-patient findings with prevalences 2 %..40 %."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.02, 0.4, labels)
    sops, pids, targets = [], [], []
    for p in range(patients):
        truth = rng.random(labels) < rates
        for k in range(int(rng.integers(1, 5))):
            sops.append(f"1.2.{p}.{k}")
            pids.append(f"PAT{p:04d}")
            targets.append(truth & (rng.random(labels) < 0.9))  # follow-ups mostly agree
    return sops, pids, np.asarray(targets, dtype=int)


def test_no_patient_in_two_splits() -> None:
    sops, pids, y = _cohort()
    split = patient_split(sops, pids, y, seed=3)
    split.check_disjoint()
    where: dict[str, set[str]] = {}
    for name, uids in split.sop_uids.items():
        for uid in uids:
            where.setdefault(pids[sops.index(uid)], set()).add(name)
    assert all(len(s) == 1 for s in where.values()), "a patient appears in two splits"
    assert set(where) == set(pids) and {split.patients[p] for p in where} <= {
        "train",
        "val",
        "test",
    }
    assert sum(len(u) for u in split.sop_uids.values()) == len(sops)
    for pid, names in where.items():
        assert split.patients[pid] == next(iter(names))


def test_stratification_holds() -> None:
    sops, pids, y = _cohort(seed=1, patients=400)
    split = patient_split(sops, pids, y, fractions=(0.6, 0.2, 0.2), seed=5)
    sizes = {name: len(uids) / len(sops) for name, uids in split.sop_uids.items()}
    assert sizes["train"] == pytest.approx(0.6, abs=0.03)
    assert sizes["val"] == pytest.approx(0.2, abs=0.03)
    totals = y.sum(axis=0)
    for j in range(y.shape[1]):
        share = {name: split.positives[name][f"label{j}"] / totals[j] for name in split.sop_uids}
        tolerance = max(0.05, 2.0 / totals[j])  # the rarest label has a handful of positives
        assert share["val"] == pytest.approx(0.2, abs=tolerance), (j, share)
        assert share["test"] == pytest.approx(0.2, abs=tolerance), (j, share)
        assert min(split.positives[name][f"label{j}"] for name in split.sop_uids) >= 1
    assert set(prevalence(split)) == {"train", "val", "test"}


def test_stratification_beats_random_on_a_rare_label() -> None:
    sops, pids, y = _cohort(seed=2, patients=150, labels=2)
    rare = y[:, 0].sum()
    deviations = []
    for seed in range(5):
        split = patient_split(sops, pids, y, seed=seed)
        deviations.append(abs(split.positives["val"]["label0"] - 0.15 * rare))
    assert max(deviations) <= 1.5  # within one-and-a-half images of the ideal on every seed


def test_same_seed_same_split_other_seed_other_split() -> None:
    sops, pids, y = _cohort()
    a = patient_split(sops, pids, y, seed=7)
    b = patient_split(sops, pids, y, seed=7)
    c = patient_split(sops, pids, y, seed=8)
    assert a.patients == b.patients and a.sop_uids == b.sop_uids
    assert a.patients != c.patients


def test_save_load_and_apply(tmp_path: Path) -> None:
    sops, pids, y = _cohort(patients=40)
    split = patient_split(sops, pids, y, seed=1, label_names=["a", "b", "c", "d"])
    path = split.save(tmp_path)
    doc = json.loads(path.read_text())
    assert path.name == "split.json" and doc["seed"] == 1
    assert set(doc["patients"]) == set(pids) and set(doc["sop_instance_uids"]) == {
        "train",
        "val",
        "test",
    }
    assert doc["counts"]["train"]["patients"] == sum(v == "train" for v in doc["patients"].values())
    loaded = PatientSplit.load(tmp_path)
    assert loaded.patients == split.patients and loaded.sop_uids == split.sop_uids
    assert loaded.label_names == ("a", "b", "c", "d")
    indexes = apply_split(loaded, sops)
    assert sorted(i for v in indexes.values() for i in v) == list(range(len(sops)))
    with pytest.raises(SplitError, match="not in the saved split"):
        apply_split(loaded, [*sops, "9.9.9"])


def test_tiny_cohort_fills_every_split() -> None:
    split = patient_split(["1", "2", "3"], ["A", "B", "C"], [[1], [0], [0]], seed=0)
    assert all(len(v) == 1 for v in split.sop_uids.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.5, 0.3, 0.3)}, "sum to 1"),
        ({"fractions": (0.0, 0.5, 0.5)}, "train > 0"),
        ({"patient_keys": ["A"]}, "one patient per image"),
        ({"sop_uids": ["1", "1"], "patient_keys": ["A", "B"]}, "unique"),
    ],
)
def test_bad_requests(kwargs: dict, match: str) -> None:
    args = {"sop_uids": ["1", "2"], "patient_keys": ["A", "B"], "targets": [[1], [0]]}
    args.update(kwargs)
    with pytest.raises(SplitError, match=match):
        patient_split(**args)


def test_two_patients_cannot_fill_three_splits() -> None:
    with pytest.raises(SplitError, match="cannot fill"):
        patient_split(["1", "2", "3"], ["A", "A", "B"], [[1], [0], [0]])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="does not exist"):
        PatientSplit.load(tmp_path / "split.json")
    (tmp_path / "split.json").write_text("{}")
    with pytest.raises(SplitError, match="cannot be read"):
        PatientSplit.load(tmp_path)
