"""`training fit --gradcam-guidance`: allowed regions in model space, the differentiable
Grad-CAM term, the augmented masks and the CLI option."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.bundle.architectures import default_gradcam_layer
from ai.networks import build_network
from ai.pixels import Letterbox, PreprocessParams
from ai.reference.localisation import LUNG_GRID, ImageLocations
from training.cli import main
from training.datasets import ClassificationDataset, ImageCache, ImageItem
from training.fit.classification import train_steps
from training.fit.guidance import (
    AllowedRegion,
    Guidance,
    GuidedDataset,
    allowed_masks,
    outside_share,
)
from training.fit.optimisation import make_optimisation
from training.synth import synthesize

TINY_NET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


# ------------------------------------------------------------------ allowed regions


def test_allowed_masks_follow_the_letterbox() -> None:
    """A 200 x 100 image in a 64 px square: content columns 16..47, rows 0..63."""
    lungs = np.zeros((LUNG_GRID, LUNG_GRID), dtype=bool)
    lungs[:, : LUNG_GRID // 2] = True  # the image's left half
    where = ImageLocations(boxes=(("cardiomegaly", (0.5, 0.5, 1.0, 1.0)),), lungs=lungs)
    box = Letterbox(200, 100, 64)
    assert (box.offset_x, box.new_width, box.offset_y, box.new_height) == (16, 32, 0, 64)

    masks = allowed_masks(where, box, ["nodule", "cardiomegaly"])

    assert masks is not None and masks.shape == (2, 64, 64) and masks.dtype == np.float32
    for k in range(2):
        assert masks[k, :, :16].max() == 0 and masks[k, :, 48:].max() == 0  # letterbox padding
        assert masks[k, :, 17:31].min() == 1.0  # the left lung half: columns 16..31
        assert masks[k, :32, 33:48].max() == 0  # right half, above the heart box
    assert masks[0, 32:, 33:48].max() == 0  # the nodule has no box here
    assert masks[1, 32:, 32:48].min() == 1.0  # the heart box: rows 32..63, columns 32..47
    assert allowed_masks(ImageLocations(boxes=()), box, ["nodule"]) is None  # no lungs: lateral


def test_allowed_region_expands_to_the_same_masks() -> None:
    lungs = np.zeros((2, 4), dtype=np.float16)
    lungs[0, 1] = 1.0
    region = AllowedRegion(lungs, ((1, 1, 2, 2, 4),))
    masks = region.masks(2)
    assert masks[0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert masks[1].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]


def test_guided_dataset_moves_masks_with_the_image() -> None:
    """Augmented: the image is exactly the plain dataset's (same draws); the mask of a
    bright square moves with the square."""
    size = 32
    image = np.zeros((1, size, size), dtype=np.float32)
    image[0, 8:24, 4:14] = 1.0
    cache = ImageCache(PreprocessParams(size=size), loader=lambda path, params: image)
    items = [ImageItem(Path(f"{i}.dcm"), f"1.2.{i}", (1.0,)) for i in range(4)]
    region = AllowedRegion(image[0].astype(np.float16), ())
    guided = GuidedDataset(items, cache, {"1.2.0": region, "1.2.1": region, "1.2.2": region},
                           augment=True, seed=5)  # fmt: skip
    plain = ClassificationDataset(items, cache, augment=True, seed=5)
    moved = 0
    for index in range(4):
        for epoch in range(3):
            ours, theirs = guided[(index, epoch)], plain[(index, epoch)]
            assert torch.equal(ours["image"], theirs["image"])
            mask = ours["allowed"][0]
            if index == 3:  # no region: no mask, an all-zero placeholder
                assert ours["has_mask"] == 0 and mask.max() == 0
                continue
            assert ours["has_mask"] == 1
            # the square's pixels are bright where the mask is (contrast/noise aside)
            inside = ours["image"][0][mask > 0.9]
            outside = ours["image"][0][mask < 0.1]
            assert inside.mean() > 0.5 > outside.mean()
            moved += int(not torch.equal(mask, torch.from_numpy(image[0])))
    assert moved > 0  # the affine did move some masks


# ------------------------------------------------------------------ the loss term


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("densenet", TINY_NET, num_classes=labels).module


def test_outside_share_counts_energy_outside() -> None:
    """d logit / dA = w, so alpha = mean(w) = 1/4 and the map is A / 4: positive at (0, 0)
    only. All of it inside the allowed region: share 0; all outside: share 1."""
    activation = torch.zeros((1, 1, 2, 2))
    activation[0, 0, 0, 0] = 1.0
    activation.requires_grad_(True)
    weights = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    allowed = torch.zeros((1, 1, 2, 2))
    allowed[0, 0, 0, 0] = 1.0
    pairs = torch.ones((1, 1), dtype=torch.bool)
    shares = [outside_share((activation * weights).sum((1, 2, 3))[:, None], activation, region,
                            pairs, create_graph=False).item() for region in (allowed, 1 - allowed)]  # fmt: skip
    assert shares == [0.0, pytest.approx(1.0, abs=1e-5)]
    none = outside_share(activation.sum((1, 2, 3))[:, None], activation, allowed,
                         torch.zeros((1, 1), dtype=torch.bool))  # fmt: skip
    assert none.shape == (0,)


def test_train_steps_adds_a_differentiable_term_that_pulls_the_map_inside(
    one_thread: None,
) -> None:
    """A zero classification loss, so only the guidance term trains: its gradient reaches
    the layers before the Grad-CAM layer (double backprop), and a few steps of
    ``train_steps`` bring the outside share down. Without guidance nothing moves."""
    cpu = torch.device("cpu")
    model = _tiny_model(2)
    guidance = Guidance.attach(model, default_gradcam_layer("densenet"), weight=1.0)
    allowed = torch.zeros((4, 2, 64, 64))
    allowed[..., :32] = 1.0  # the left half of every image, for both labels
    batch = {"image": torch.rand((4, 1, 64, 64), generator=torch.Generator().manual_seed(1)),
             "target": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]),
             "has_mask": torch.tensor([1.0, 1.0, 1.0, 0.0]), "allowed": allowed}  # fmt: skip
    model.train()
    guidance.term(model(batch["image"]), batch, cpu).backward()
    stem = model.features.conv0.weight
    assert stem.grad is not None and float(stem.grad.abs().sum()) > 0
    assert guidance.epoch_mean() > 0.3  # and the running mean restarts

    def zero_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.sum() * 0.0

    opt = make_optimisation(model, cpu, lr=3e-3, weight_decay=0.0, total_steps=8,
                            warmup_steps=0, min_lr_ratio=1.0, amp=False, clip_grad=0.0)  # fmt: skip
    start = stem.detach().clone()
    train_steps(model, [batch] * 8, zero_loss, opt, cpu, max_steps=8)  # type: ignore[arg-type]
    assert torch.equal(stem, start)  # no guidance: no gradient, no step
    guidance._activation = None  # the forwards above had no term
    losses: list[float] = []
    steps, mean = train_steps(model, [batch] * 8, zero_loss, opt, cpu, max_steps=8,  # type: ignore[arg-type]
                              on_step=lambda loss, lr: losses.append(loss), guidance=guidance)  # fmt: skip
    assert steps == 8 and mean == pytest.approx(np.mean(losses))
    assert guidance.epoch_mean() == pytest.approx(mean)
    assert losses[0] > 0.3 and losses[-1] < 0.5 * losses[0], losses
    # a batch without a positive label with a mask: no term, nothing recorded
    empty = {**batch, "has_mask": torch.zeros(4)}
    assert float(guidance.term(model(batch["image"]), empty, cpu).detach()) == 0.0
    assert np.isnan(guidance.epoch_mean())


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guided") / "data"
    synthesize(root, 16, seed=3, size=96, prevalence=0.5)
    return root


def _fit_args(data: Path, out: Path, labels: Path | None = None, *extra: str) -> list[str]:
    return ["-q", "fit", "--data", str(data), "--labels", str(labels or data / "labels.csv"),
            "--out", str(out), "--network", "densenet", "--network-args", json.dumps(TINY_NET),
            "--image-size", "64", "--batch-size", "8", "--threads", "1", "--seed", "1",
            "--split", "0.6,0.2,0.2", "--epochs", "1", "--max-steps", "2", *extra]  # fmt: skip


def test_cli_fit_records_the_weight(data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(_fit_args(data, tmp_path / "guided", None, "--gradcam-guidance", "1.0")) == 0
    meta = json.loads((tmp_path / "guided/bundle/configs/metadata.json").read_text())
    record = meta["training"]["gradcam_guidance"]
    assert record["weight"] == 1.0 and record["layer"] == default_gradcam_layer("densenet")
    assert record["train_images_with_mask"] > 0
    history = json.loads((tmp_path / "guided/metrics.json").read_text())["history"]
    assert 0.0 <= history[0]["gradcam_outside"] <= 1.0
    saved = json.loads((tmp_path / "guided/run_config.json").read_text())["args"]
    assert saved["gradcam_guidance"] == 1.0
    resume = ["-q", "fit", "--resume", str(tmp_path / "guided"), "--epochs", "2", "--max-steps", "4"]
    assert main([*resume, "--gradcam-guidance", "0"]) == 1
    assert "cannot change: ['gradcam_guidance']" in capsys.readouterr().err
    assert main(resume) == 0  # continues guided
    history = json.loads((tmp_path / "guided/metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2] and 0.0 <= history[1]["gradcam_outside"] <= 1.0

    assert main(_fit_args(data, tmp_path / "plain")) == 0  # off: a plain fit's records
    meta = json.loads((tmp_path / "plain/bundle/configs/metadata.json").read_text())
    assert "gradcam_guidance" not in meta["training"]
    history = json.loads((tmp_path / "plain/metrics.json").read_text())["history"]
    assert "gradcam_outside" not in history[0]


def test_cli_refusals_are_messages(data: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    elsewhere = tmp_path / "labels"
    elsewhere.mkdir()
    shutil.copy(data / "labels.csv", elsewhere / "labels.csv")  # no locations.json beside it
    cases = [
        (_fit_args(data, tmp_path / "r1", elsewhere / "labels.csv", "--gradcam-guidance", "1"),
         1, "--gradcam-guidance needs lung masks: no locations.json beside --labels"),
        (_fit_args(data, tmp_path / "r2", None, "--gradcam-guidance", "-0.5"),
         1, "--gradcam-guidance -0.5 must be a finite weight >= 0"),
        (_fit_args(data, tmp_path / "r3", None, "--gradcam-guidance", "nan"),
         1, "must be a finite weight >= 0"),
        (_fit_args(data, tmp_path / "r4", None, "--task", "detection", "--gradcam-guidance", "1"),
         2, "--gradcam-guidance do not apply to --task detection"),
        (_fit_args(data, tmp_path / "r5", None, "--gradcam-guidance", "lots"),
         2, "invalid float value"),
    ]  # fmt: skip
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not (Path(argv[argv.index("--out") + 1]) / "last.pt").exists()
