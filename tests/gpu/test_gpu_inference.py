"""The node's models on CUDA agree with the CPU: findings, detector boxes and Grad-CAM maps.

Run with ``pytest -m gpu`` on a machine with an NVIDIA GPU; skipped elsewhere (see the
``gpu`` hook in tests/conftest.py). Nothing here touches CUDA at import time. The tiny
random bundles of tests/helpers/bundles.py (a classifier whose ``nodule`` is always
positive, so Grad-CAM runs, and a RetinaNet detector with confident boxes) analyse two
phantoms on the CPU and on the GPU with torch's defaults (TF32 convolutions included), so
the tolerances are those of float32 against TF32 arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from helpers.bundles import make_detector_bundle, make_tiny_bundle

from ai.gradcam import GradCAM
from ai.inference import Analyzer
from ai.networks import build_network
from ai.types import ImageResult
from training.synth import make_dataset

pytestmark = pytest.mark.gpu

PROBABILITY_TOLERANCE = 5e-3
# Grad-CAM maps are scaled to [0, 1]. With TF32 emulated on the CPU (inputs and weights of
# every convolution rounded to 10 mantissa bits) DenseNet-121's maps moved by 0.018 at most
# and 0.0006 on average (correlation 0.99995); the tiny bundle's by 1e-7.
MAP_TOLERANCE = 0.05
MAP_MEAN_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gpu-bundles")
    return [make_tiny_bundle(root / "cls"), make_detector_bundle(root / "det")]


@pytest.fixture(scope="module")
def radiographs() -> list[pydicom.Dataset]:
    return [
        make_dataset("cr_mono2_16bit_rescale", seed=7, rows=300, columns=220,
                     findings={"nodule": True}),
        make_dataset("dx_mono1_j2k", seed=11, rows=256, columns=320, findings={}),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def results(bundles: list[Path], radiographs: list[pydicom.Dataset]
            ) -> dict[str, list[ImageResult]]:  # fmt: skip
    """The same images through the same bundles, on the CPU and on CUDA."""
    out = {}
    for device in ("cpu", "cuda"):
        analyzer = Analyzer(bundles, device=device)
        assert analyzer.device.type == device
        out[device] = analyzer.analyze(radiographs)
    return out


def _by_task(result: ImageResult, task: str) -> list:
    return [f for f in result.findings if f.model.task == task]


def test_analyzer_loads_its_bundles_onto_the_gpu(bundles: list[Path]) -> None:
    before = torch.cuda.memory_allocated()
    analyzer = Analyzer(bundles, device="cuda")
    assert analyzer.device == torch.device("cuda")
    assert torch.cuda.memory_allocated() > before  # the weights live on the GPU
    del analyzer


def test_classifier_findings_on_cuda_match_the_cpu(results: dict[str, list[ImageResult]]
                                                   ) -> None:  # fmt: skip
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        assert gpu.sop_instance_uid == cpu.sop_instance_uid
        cpu_cls, gpu_cls = _by_task(cpu, "classification"), _by_task(gpu, "classification")
        assert [f.label for f in gpu_cls] == [f.label for f in cpu_cls] == [
            "nodule", "cardiomegaly", "pneumothorax"]  # fmt: skip
        for c, g in zip(cpu_cls, gpu_cls, strict=True):
            assert abs(g.probability - c.probability) <= PROBABILITY_TOLERANCE, g.label
            if abs(c.probability - c.threshold) > PROBABILITY_TOLERANCE:
                assert g.positive == c.positive, g.label
        assert gpu_cls[0].positive and not gpu_cls[2].positive  # thresholds 0.0 and 1.0


def test_detector_boxes_on_cuda_match_the_cpu(results: dict[str, list[ImageResult]]) -> None:
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        cpu_det, gpu_det = _by_task(cpu, "detection"), _by_task(gpu, "detection")
        assert len(gpu_det) == len(cpu_det) == 3
        assert all(f.positive and f.box is not None for f in gpu_det)
        cpu_scores = sorted(f.probability for f in cpu_det)
        gpu_scores = sorted(f.probability for f in gpu_det)
        assert np.allclose(gpu_scores, cpu_scores, atol=PROBABILITY_TOLERANCE)
        for box in (f.box for f in gpu_det):
            assert box is not None
            assert 0 <= box.x0 < box.x1 <= gpu.columns and 0 <= box.y0 < box.y1 <= gpu.rows


def test_gradcam_heatmap_on_cuda_matches_the_cpu(results: dict[str, list[ImageResult]]) -> None:
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        assert cpu.heatmap is not None and gpu.heatmap is not None  # nodule is always positive
        assert gpu.heatmap.shape == (gpu.rows, gpu.columns) and gpu.heatmap.dtype == np.float32
        diff = np.abs(gpu.heatmap - cpu.heatmap)
        assert diff.max() <= MAP_TOLERANCE and diff.mean() <= MAP_MEAN_TOLERANCE
        assert np.corrcoef(gpu.heatmap.ravel(), cpu.heatmap.ravel())[0, 1] > 0.99
        cpu_box = _by_task(cpu, "classification")[0].box
        gpu_box = _by_task(gpu, "classification")[0].box
        assert cpu_box is not None and gpu_box is not None
        # the box around the map's hot region moves by a pixel or two at most
        edges = np.array([gpu_box.x0 - cpu_box.x0, gpu_box.y0 - cpu_box.y0,
                          gpu_box.x1 - cpu_box.x1, gpu_box.y1 - cpu_box.y1])  # fmt: skip
        assert np.abs(edges).max() <= 0.02 * max(gpu.rows, gpu.columns)


@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_gradcam_maps_on_cuda_match_the_cpu(name: str) -> None:
    """The Grad-CAM class itself, on the node's full-size networks, batch of three."""
    torch.manual_seed(0)
    model, layer = build_network(name, {}, num_classes=5)
    model.eval().requires_grad_(False)
    x = torch.rand(3, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    cam = GradCAM(model, layer)
    cpu_maps = cam(x, 2)
    model.cuda()
    gpu_maps = cam(x.cuda(), 2)
    cam.close()
    assert gpu_maps.is_cuda and gpu_maps.shape == (3, 128, 128)
    diff = (gpu_maps.cpu() - cpu_maps).abs()
    assert diff.max().item() <= MAP_TOLERANCE and diff.mean().item() <= MAP_MEAN_TOLERANCE, (
        diff.max().item(), diff.mean().item())
