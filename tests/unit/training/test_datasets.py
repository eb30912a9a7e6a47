"""Datasets through the node's preprocessing, the array cache, augmentation, samplers, losses."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Flip, RandAxisFlip, RandFlip, RandRotate90

from ai.pixels import PreprocessParams, preprocess
from training.datasets import (
    ClassificationDataset,
    ImageCache,
    ImageItem,
    load_preprocessed,
    params_hash,
)
from training.losses import ClassificationLoss
from training.sampling import EpochSampler, ShardSampler, inverse_frequency_weights, repeat_factors
from training.synth import synthesize


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[ImageItem]:
    root = tmp_path_factory.mktemp("ds") / "data"
    synthesize(root, 5, seed=21, size=(120, 96), prevalence=0.5)
    with (root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [ImageItem(root / r["path"], r["sop_instance_uid"],
                      (float(r["nodule"]), float(r["cardiomegaly"]))) for r in rows]  # fmt: skip


class CountingLoader:
    """Wraps the real DICOM loader and counts calls (i.e. DICOM decodes)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path, params: PreprocessParams) -> np.ndarray:
        self.calls.append(path.name)
        return load_preprocessed(path, params)


def test_same_arrays_as_the_node(items: list[ImageItem]) -> None:
    params = PreprocessParams(size=48, clahe=True)
    cache = ImageCache(params)
    for item in items[:3]:
        expected, _ = preprocess(pydicom.dcmread(item.path), params)
        assert np.array_equal(cache.get(item), expected)
        assert np.array_equal(ClassificationDataset([item], cache)[0]["image"].numpy(), expected)


def test_memory_cache_decodes_once(items: list[ImageItem]) -> None:
    loader = CountingLoader()
    cache = ImageCache(PreprocessParams(size=32), loader=loader)
    dataset = ClassificationDataset(items, cache, augment=True)
    for epoch in range(3):
        for i in range(len(dataset)):
            dataset[(i, epoch)]
    assert len(loader.calls) == len(items)
    assert cache.hits == {"memory": 2 * len(items), "disk": 0, "decoded": len(items)}


def test_disk_cache_survives_processes_and_is_keyed_by_params(
    items: list[ImageItem], tmp_path: Path
) -> None:
    params = PreprocessParams(size=32)
    first = CountingLoader()
    ImageCache(params, tmp_path, loader=first).get(items[0])
    files = list(tmp_path.glob("*.npy"))
    assert [f.name for f in files] == [f"{items[0].sop_instance_uid}_{params_hash(params)}.npy"]
    again = CountingLoader()  # a new cache object: a later epoch in a worker, or a resumed run
    fresh = ImageCache(params, tmp_path, loader=again)
    assert np.array_equal(
        fresh.get(items[0]), first_array := load_preprocessed(items[0].path, params)
    )
    assert again.calls == [] and fresh.hits["disk"] == 1
    other = CountingLoader()
    ImageCache(PreprocessParams(size=32, clahe=True), tmp_path, loader=other).get(items[0])
    assert len(other.calls) == 1 and len(list(tmp_path.glob("*.npy"))) == 2
    files[0].write_bytes(b"not an array")  # a damaged cache file is ignored and rewritten
    repaired = CountingLoader()
    assert np.array_equal(ImageCache(params, tmp_path, loader=repaired).get(items[0]), first_array)
    assert len(repaired.calls) == 1
    assert params_hash(params) == params_hash(PreprocessParams(size=32, max_pixels=10**6))


def test_memory_budget(items: list[ImageItem]) -> None:
    loader = CountingLoader()
    cache = ImageCache(PreprocessParams(size=32), memory_bytes=32 * 32 * 4, loader=loader)
    for _ in range(2):
        for item in items[:2]:
            cache.get(item)
    assert len(loader.calls) == 3  # only the first image fits the budget


def test_augmentation_is_seeded_by_epoch_and_index(items: list[ImageItem]) -> None:
    cache = ImageCache(PreprocessParams(size=48))
    plain = ClassificationDataset(items, cache)
    aug = ClassificationDataset(items, cache, augment=True, seed=3)
    again = ClassificationDataset(items, cache, augment=True, seed=3)
    a, b = aug[(1, 4)]["image"], again[(1, 4)]["image"]
    assert torch.equal(a, b) and type(a) is torch.Tensor and a.shape == (1, 48, 48)
    assert not torch.equal(a, aug[(1, 5)]["image"])
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(plain[1]["image"], torch.from_numpy(cache.get(items[1])))
    assert plain[1]["target"].tolist() == list(items[1].targets) and plain[1]["index"] == 1
    kinds = (Flip, RandFlip, RandAxisFlip, RandRotate90)
    assert not any(isinstance(t, kinds) for t in aug.transform.transforms), "no flips on chests"


def test_epoch_sampler_modes() -> None:
    targets = np.zeros((100, 2))
    targets[:5, 0] = 1  # rare
    targets[5:50, 1] = 1  # common
    uniform = EpochSampler(100, seed=1)
    uniform.set_epoch(0)
    keys = list(uniform)
    assert sorted(i for i, _ in keys) == list(range(100)) and {e for _, e in keys} == {0}
    uniform.set_epoch(1)
    assert [i for i, _ in uniform] != [i for i, _ in keys]
    weighted = EpochSampler(100, mode="weighted", targets=targets, seed=1)
    drawn = np.bincount([i for i, _ in weighted], minlength=100)
    assert drawn[:5].sum() > 15  # 5 % of the images, about a third of the draws
    weights = inverse_frequency_weights(targets)
    assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[10] > 0
    factors = repeat_factors(targets, max_factor=4)
    assert factors[0] == 4 and factors[10] == 1 and factors[60] == 1
    over = EpochSampler(100, mode="oversample", targets=targets, seed=1)
    assert len(over) == 100 + 5 * 3
    assert np.bincount([i for i, _ in over])[0] == 4


def test_epoch_sampler_shards_like_distributed_sampler() -> None:
    shards = [EpochSampler(11, num_replicas=2, rank=r, seed=4) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    a, b = ([i for i, _ in s] for s in shards)
    assert len(a) == len(b) == 6 and set(a) | set(b) == set(range(11))
    assert list(ShardSampler(5, 2, 0)) == [0, 2, 4] and list(ShardSampler(5, 2, 1)) == [1, 3]
    with pytest.raises(ValueError, match="needs the training targets"):
        EpochSampler(4, mode="weighted")


def test_focal_loss_reduces_to_bce_and_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    multi = (torch.rand(6, 3) > 0.5).float()
    onehot = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, multi)
    ce = torch.nn.functional.cross_entropy(logits, onehot.argmax(1))
    assert ClassificationLoss(True)(logits, multi) == pytest.approx(bce.item())
    assert ClassificationLoss(True, "focal", gamma=0.0)(logits, multi) == pytest.approx(bce.item())
    assert ClassificationLoss(False)(logits, onehot) == pytest.approx(ce.item())
    assert ClassificationLoss(False, "focal", gamma=0.0)(logits, onehot) == pytest.approx(ce.item())
    assert ClassificationLoss(True, "focal", gamma=2.0)(logits, multi) < bce
    with pytest.raises(ValueError, match="must be one of"):
        ClassificationLoss(True, "hinge")
