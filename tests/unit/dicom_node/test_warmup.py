"""The worker's warm-up (``dicom_node.warmup``): one synthetic image analysed by the real
analyzer and its outputs built by the real builders, nothing kept; a failing warm-up never
stops a worker; after it, a first real job loads none of the first-use state a cold one
does (highdicom's standard tables, the SC encoder's modules), counted in fresh processes;
both worker layouts warm before they say ready, and ``workers.warm_up: false`` skips it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, wait_until
from helpers.dicomfiles import write_phantom_study
from helpers.node import node_settings

from ai.types import ImageResult
from dicom_node import warmup
from dicom_node.analysis import build_analyzer, load_analyzer
from dicom_node.service import Node
from dicom_node.worker import output_settings


class Counting:
    """The real analyzer, its calls counted."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: list[list[pydicom.Dataset]] = []

    @property
    def models(self) -> list:  # type: ignore[type-arg]
        return self.inner.models  # type: ignore[attr-defined,no-any-return]

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        self.calls.append(list(datasets))
        return self.inner.analyze(datasets)  # type: ignore[attr-defined,no-any-return]


def test_synthetic_radiograph_is_a_chest_cr_without_a_patient() -> None:
    ds = warmup.synthetic_radiograph(256)
    pixels = ds.pixel_array
    assert (ds.Modality, ds.BodyPartExamined, ds.SOPClassUID) == (
        "CR", "CHEST", warmup.COMPUTED_RADIOGRAPHY)
    assert pixels.shape == (256, 256) and pixels.max() < 4096  # 12 bits stored
    assert pixels[128, 128] > 3000 > 2000 > pixels[0, 0]  # the blob, then the background
    assert ds.PatientID == "WARM-UP"


def test_warm_up_runs_the_real_analyzer_and_builders_once(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path)
    analyzer = Counting(build_analyzer(settings, [tiny_bundle]))
    built: list[str] = []
    real_build = warmup.build_outputs

    def spy(items, out_settings, uid_seed):  # type: ignore[no-untyped-def]
        objects = real_build(items, out_settings, uid_seed)
        built.extend(o.kind for o in objects)
        return objects

    monkeypatch.setattr(warmup, "build_outputs", spy)
    with caplog.at_level(logging.INFO, logger="dicom_node.warmup"):
        took = warmup.warm_up(analyzer, output_settings(settings))
    assert took is not None and took > 0
    assert len(analyzer.calls) == 1 and len(analyzer.calls[0]) == 1
    assert analyzer.calls[0][0].PatientID == "WARM-UP"
    assert built == ["sr", "sc", "gsps"]  # the shipped outputs, each built for real
    assert "warm-up: a synthetic image analysed" in caplog.text
    assert not list(tmp_path.rglob("*.dcm"))  # nothing written


def test_a_failing_warm_up_is_logged_and_the_worker_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        models: list = []  # type: ignore[type-arg]

        def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
            raise RuntimeError("no kernel for this device")

    with caplog.at_level(logging.WARNING, logger="dicom_node.warmup"):
        assert warmup.warm_up(Broken(), output_settings(node_settings(tmp_path))) is None
    assert "warm-up failed (RuntimeError: no kernel for this device)" in caplog.text


_PROBE = """
import json, sys, tempfile
from pathlib import Path
import pydicom
from highdicom import _standard_utils as standard
from dicom_node.analysis import build_analyzer
from dicom_node.config import load_settings
from dicom_node.outputs import build_outputs
from dicom_node.warmup import warm_up
from dicom_node.worker import output_settings
bundle, image, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"
settings = load_settings(None, overrides={"storage.data_dir": tempfile.mkdtemp()}, environ={})
analyzer = build_analyzer(settings, [Path(bundle)])
if warm:
    assert warm_up(analyzer, output_settings(settings)) is not None
ds = pydicom.dcmread(image)
modules, tables = set(sys.modules), standard.get_module_attribute_map.cache_info().misses
(result,) = analyzer.analyze([ds])
objects = build_outputs([(ds, result)], output_settings(settings), "1.2.826.0.1.3680043.8.498.7")
print(json.dumps({"imported": sorted(set(sys.modules) - modules),
                  "tables": standard.get_module_attribute_map.cache_info().misses - tables,
                  "kinds": [o.kind for o in objects]}))
"""


@pytest.mark.slow
def test_after_the_warm_up_the_first_job_loads_nothing_for_the_first_time(
        tiny_bundle: Path, tmp_path: Path) -> None:
    """Counted, not timed, each in a fresh interpreter (this one imported everything long
    ago): a cold first job reads highdicom's module tables and imports modules (the SC
    encoder's among them); after the warm-up the same job does neither."""
    _, (image,) = write_phantom_study(tmp_path / "study", 1, seed=5, rows=600, cols=500)

    def first_job(mode: str) -> dict:  # type: ignore[type-arg]
        res = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_bundle), str(image), mode],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    cold, warm = first_job("cold"), first_job("warm")
    assert cold["kinds"] == warm["kinds"] == ["sr", "sc", "gsps"]
    assert cold["tables"] == 1 and cold["imported"]  # what the warm-up is for
    assert warm["tables"] == 0 and warm["imported"] == []


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_a_thread_worker_warms_before_its_models_are_ready_unless_disabled(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """Thread layout with the real loader (the process layout calls the same function
    before its ready report: tests/e2e/test_make_demo.py finds its log line before the
    node's "models loaded")."""
    import dicom_node.service as service

    order: list[str] = []
    real = warmup.warm_up

    def spy(analyzer, out_settings):  # type: ignore[no-untyped-def]
        order.append("warm-up" if node.analyzer is None else "after ready")
        return real(analyzer, out_settings)

    monkeypatch.setattr(service, "warm_up", spy)
    settings = node_settings(tmp_path, **{"models.bundles": [str(tiny_bundle)],
                                          "models.device": "cpu", "workers.mode": "thread",
                                          "workers.warm_up": enabled})
    node = Node(settings, load_analyzer)
    node.start()
    try:
        wait_until(lambda: node.analyzer is not None, 120, what="models loaded")
        assert order == (["warm-up"] if enabled else [])
    finally:
        node.stop()
