"""The parent's view of the models its worker processes loaded: the reported identities at
once, the bundles themselves loaded only when an evaluation job analyses, with torch held to
one thread meanwhile (the receiver shares that process) and restored after."""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
import torch
from helpers.dicomfiles import make_image
from helpers.fakes import FAKE_MODEL, FakeAnalyzer

from ai.types import ImageResult
from dicom_node.worker_process import DeployedModels


class _ThreadsSeen(FakeAnalyzer):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        self.threads.append(torch.get_num_threads())
        return super().analyze(datasets)


def test_models_are_the_reported_ones_and_the_bundles_load_once_on_first_use() -> None:
    loads: list[_ThreadsSeen] = []

    def load() -> _ThreadsSeen:
        loads.append(_ThreadsSeen())
        return loads[-1]

    deployed = DeployedModels([FAKE_MODEL], load)
    assert deployed.models == [FAKE_MODEL] and loads == []  # nothing loaded for the list
    before = torch.get_num_threads()
    for seed in (1, 2):
        [result] = deployed.analyze([make_image(seed=seed)])
        assert result.findings
    assert len(loads) == 1 and loads[0].threads == [1, 1]
    assert torch.get_num_threads() == before
