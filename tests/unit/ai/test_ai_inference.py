"""Analyzer end to end: real radiographs in, findings, boxes and heatmaps in source pixels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aihelpers import LABELS, grey_dataset, make_bundle

from ai.bundle.metadata import METADATA_PATH
from ai.inference import Analyzer, cam_box
from ai.types import BundleError, PixelDataError


@pytest.fixture(scope="module")
def always_positive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "positive"
    make_bundle(path, name="always-positive", thresholds=0.0)
    return path


@pytest.fixture(scope="module")
def never_positive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "negative"
    make_bundle(path, name="never-positive", thresholds=1.0, seed=3)
    return path


@pytest.fixture
def real_images(realdicom: Path) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(realdicom / "cr_chest_pa_philips_j2k.dcm"),
        pydicom.dcmread(realdicom / "dx_chest_nih_cxr14_sc.dcm"),
    ]


def test_end_to_end_on_real_files(always_positive: Path, real_images: list) -> None:
    analyzer = Analyzer([always_positive], device="cpu")
    results = analyzer.analyze(real_images)
    assert [r.sop_instance_uid for r in results] == [ds.SOPInstanceUID for ds in real_images]
    for result, ds in zip(results, real_images, strict=True):
        assert (result.rows, result.columns) == (ds.Rows, ds.Columns)
        assert [f.label for f in result.findings] == list(LABELS)
        assert all(f.positive and 0.0 <= f.probability <= 1.0 for f in result.findings)
        assert result.heatmap is not None
        assert result.heatmap.shape == (ds.Rows, ds.Columns)
        assert result.heatmap.dtype == np.float32
        assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
        for finding in result.findings:
            assert finding.model == analyzer.models[0]
            if finding.box is not None:
                assert 0 <= finding.box.x0 < finding.box.x1 <= ds.Columns
                assert 0 <= finding.box.y0 < finding.box.y1 <= ds.Rows
        assert any(f.box is not None for f in result.findings)


def test_negative_findings_have_no_heatmap_or_box(never_positive: Path, real_images: list) -> None:
    (result,) = Analyzer([never_positive], device="cpu").analyze(real_images[1:])
    assert not result.abnormal and result.heatmap is None
    assert all(f.box is None and f.threshold == 1.0 for f in result.findings)


def test_two_bundles_merge(always_positive: Path, never_positive: Path) -> None:
    rng = np.random.default_rng(0)
    images = [
        grey_dataset(rng.integers(0, 4096, (300, 200), dtype=np.uint16), bits_stored=12)
        for _ in range(3)
    ]
    analyzer = Analyzer([always_positive, never_positive], device="cpu", batch_size=2,
                        finding_maps=True)
    results = analyzer.analyze(images)
    assert len(results) == 3
    assert [m.name for m in analyzer.models] == ["always-positive", "never-positive"]
    for result in results:
        assert len(result.findings) == 2 * len(LABELS)
        assert result.models == analyzer.models
        assert {f.model.name for f in result.positive_findings} == {"always-positive"}
        assert result.heatmap is not None and result.heatmap.shape == (300, 200)
        # each positive finding has its own map (the SEG's segments); the combined one is
        # their maximum, and the never-positive bundle adds none
        keys = {(f.model.device_uid, f.label) for f in result.positive_findings}
        assert set(result.finding_heatmaps) == keys
        own = np.stack(list(result.finding_heatmaps.values()))
        assert own.shape[1:] == (300, 200) and own.dtype == np.float32
        np.testing.assert_array_equal(own.max(axis=0), result.heatmap)


def test_batching_does_not_change_results(always_positive: Path) -> None:
    rng = np.random.default_rng(1)
    images = [grey_dataset(rng.integers(0, 256, (90, 120), dtype=np.uint8)) for _ in range(3)]
    one = Analyzer([always_positive], device="cpu", batch_size=1).analyze(images)
    many = Analyzer([always_positive], device="cpu", batch_size=8).analyze(images)
    for a, b in zip(one, many, strict=True):
        pa = [f.probability for f in a.findings]
        pb = [f.probability for f in b.findings]
        np.testing.assert_allclose(pa, pb, atol=1e-5)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_without_gradcam(always_positive: Path) -> None:
    image = grey_dataset(np.zeros((64, 80), np.uint16) + 7)
    (result,) = Analyzer([always_positive], device="cpu", gradcam=False).analyze([image])
    assert result.abnormal and result.heatmap is None
    assert all(f.box is None for f in result.findings)


def test_box_and_heatmap_land_on_the_source_object(
    always_positive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a CAM equal to the input image, the box must enclose the bright object."""
    pixels = np.zeros((500, 300), np.uint16)
    pixels[310:370, 40:100] = 4000  # rows 310..370, columns 40..100
    image = grey_dataset(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    analyzer = Analyzer([always_positive], device="cpu")
    runner = analyzer._runners[0]

    def fake_forward(batch: object) -> tuple[np.ndarray, dict]:
        arr = np.asarray(batch)
        probs = np.ones((arr.shape[0], len(LABELS)))
        return probs, {(b, 0): arr[b, 0] for b in range(arr.shape[0])}

    monkeypatch.setattr(runner, "_forward", fake_forward)
    (result,) = analyzer.analyze([image])
    box = result.findings[0].box
    assert box is not None
    tol = 1.5 * 500 / 64  # a model pixel and a half, in source pixels
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((40, 310, 100, 370), abs=tol)
    assert result.heatmap is not None
    assert result.heatmap[340, 70] > 0.9 and result.heatmap[100, 200] == 0.0


def test_cam_box_largest_component() -> None:
    cam = np.zeros((20, 20), np.float32)
    cam[2:4, 2:4] = 1.0  # small, hot
    cam[10:16, 5:12] = 0.8  # large, warm
    assert cam_box(cam) == (5, 10, 12, 16)
    assert cam_box(np.zeros((5, 5), np.float32)) is None


def test_bad_image_names_its_uid(always_positive: Path) -> None:
    image = grey_dataset(np.zeros((64, 64), np.uint16))
    image.PixelData = image.PixelData[:10]
    with pytest.raises(PixelDataError, match=str(image.SOPInstanceUID)):
        Analyzer([always_positive], device="cpu").analyze([image])


def test_max_pixels_is_enforced(always_positive: Path) -> None:
    image = grey_dataset(np.zeros((64, 64), np.uint16))
    with pytest.raises(PixelDataError, match="max_pixels=1000"):
        Analyzer([always_positive], device="cpu", max_pixels=1000).analyze([image])


def test_mislabelled_detection_bundle_refused(random_bundle: Path, tmp_path: Path) -> None:
    import json

    bundle = tmp_path / "det"
    shutil.copytree(random_bundle, bundle)
    doc = json.loads((bundle / METADATA_PATH).read_text())
    doc["task"] = "detection"
    (bundle / METADATA_PATH).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match='task "detection"'):
        Analyzer([bundle], device="cpu")


def test_needs_a_bundle() -> None:
    with pytest.raises(BundleError, match="at least one"):
        Analyzer([], device="cpu")


def test_same_bundle_twice_is_refused(random_bundle: Path) -> None:
    with pytest.raises(BundleError, match="share a device UID"):
        Analyzer([random_bundle, random_bundle], device="cpu")
