"""GPU out-of-memory during inference (QUALITY 19): retry one image at a time, then on the
CPU; when even that fails, a transient error the node retries while it keeps receiving."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
from helpers.dicomfiles import make_image

from ai.inference import Analyzer
from ai.types import ResourceExhaustedError


def _datasets(n: int) -> list[pydicom.Dataset]:
    return [make_image(rows=300, cols=260, seed=i) for i in range(n)]


def test_oom_with_a_batch_retries_one_image_at_a_time(tiny_bundle: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    analyzer = Analyzer([tiny_bundle], device="cpu")
    runner = analyzer._runners[0]
    real_run, sizes = runner.run, []

    def run(prepared):  # type: ignore[no-untyped-def]
        sizes.append(len(prepared))
        if len(prepared) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(prepared)

    monkeypatch.setattr(runner, "run", run)
    results = analyzer.analyze(_datasets(3))
    assert sizes == [3, 1, 1, 1]
    assert [len(r.findings) for r in results] == [3, 3, 3]


def test_oom_on_the_device_falls_back_to_cpu(tiny_bundle: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    analyzer = Analyzer([tiny_bundle], device="cpu")
    expected = analyzer.analyze(_datasets(2))
    analyzer.device = torch.device("cuda", 0)  # pretend the models live on a GPU that is full

    def always_oom(prepared):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(analyzer._runners[0], "run", always_oom)
    results = analyzer.analyze(_datasets(2))
    got = [f.probability for r in results for f in r.findings]
    assert got == pytest.approx([f.probability for r in expected for f in r.findings], abs=1e-5)
    assert 0 in analyzer._cpu_runners


def test_oom_everywhere_is_a_transient_error(tiny_bundle: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    analyzer = Analyzer([tiny_bundle], device="cpu")

    def always_oom(prepared):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(analyzer._runners[0], "run", always_oom)
    with pytest.raises(ResourceExhaustedError, match="out of memory"):
        analyzer.analyze(_datasets(1))
