"""RetinaNet detection bundles: arguments, torchvision-free build, round trip, node merge.

A tiny random detector (quarter-width ResNet-10, 16-channel FPN, one head convolution)
runs next to the tiny classifier of ``tests/helpers/bundles.py``; its classification bias
is raised so that it reports confident boxes, which must land on the source image, in the
SR regions, the GSPS graphics and the burnt-in SC.
"""

from __future__ import annotations

import importlib.abc
import json
import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from helpers.bundles import TINY_DETECTOR as TINY
from helpers.bundles import make_detector_bundle, make_tiny_bundle

from ai import detection_shims
from ai.bundle.architectures import RetinaNetSpec
from ai.bundle.load import load_bundle
from ai.bundle.metadata import METADATA_PATH, read_metadata
from ai.codes import default_code
from ai.detection import (
    build_detector,
    configure_for_training,
    detect,
    from_monai_boxes,
    to_monai_boxes,
)
from ai.inference import Analyzer
from ai.pixels import PreprocessParams, preprocess
from ai.types import BoundingBox, BundleError, ImageResult, ModelIdentity
from dicom_node.evaluation.figures import detection_figures, reference_boxes
from dicom_node.outputs import OutputSettings, build_outputs
from training.synth import make_dataset


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return make_tiny_bundle(root / "cls"), make_detector_bundle(root / "det")


@pytest.fixture(scope="module")
def radiograph() -> pydicom.Dataset:
    ds = make_dataset("cr_mono2_16bit_rescale", seed=7, rows=300, columns=220,
                      findings={"nodule": True})  # fmt: skip
    ds.ImagerPixelSpacing = [0.15, 0.15]
    return ds


# --------------------------------------------------------------------------------------------
# Network arguments and the build


def test_spec_defaults_and_anchor_shapes() -> None:
    spec = RetinaNetSpec.from_args({"anchor_sizes": [10], "aspect_ratios": [1, 4]})
    assert spec.levels == 3 and spec.size_divisible == 16
    (h1, w1), (h2, w2) = spec.base_anchor_shapes()
    assert (h1, w1) == (10, 10) and (h2, w2) == pytest.approx((5, 20))  # ratio = width / height
    assert RetinaNetSpec.from_args(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"backbone": "vgg16"}, r'network.args.backbone = "vgg16" must be one of'),
        ({"fpn_channels": 12}, r"fpn_channels .* multiple of 8"),
        ({"returned_layers": [3, 1]}, r"returned_layers .* increasing"),
        ({"anchor_size": [8]}, r"unknown keys \['anchor_size'\]"),
        ({"score_thresh": "high"}, r"score_thresh .* wrong type"),
        ({"no_max_pool": 1}, r"no_max_pool .* wrong type"),
    ],
)
def test_bad_arguments_are_named(args: dict, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        RetinaNetSpec.from_args(args)


def test_box_axes_swap_only_at_the_monai_boundary() -> None:
    xyxy = np.array([[1.0, 2.0, 11.0, 32.0]])  # wide: columns 1..11, rows 2..32
    monai = to_monai_boxes(xyxy)
    assert monai.tolist() == [[2.0, 1.0, 32.0, 11.0]]
    assert from_monai_boxes(monai).tolist() == xyxy.tolist()


class _NoTorchvision(importlib.abc.MetaPathFinder):
    """Records (and refuses) any attempt to import torchvision."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "torchvision":
            self.attempts.append(name)
            raise ImportError(f"test: {name} must not be imported")
        return None


def test_builds_trains_and_detects_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = _NoTorchvision()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    torch.manual_seed(0)
    detector = build_detector(TINY, num_classes=2)
    configure_for_training(detector, TINY)
    detector.train()
    images = torch.rand(2, 1, 64, 64)
    targets = [
        {"boxes": to_monai_boxes([[10, 12, 30, 28]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # negative
    ]
    losses = detector(images, targets)
    (losses["classification"] + losses["box_regression"]).backward()
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in detector.parameters())
    detector.eval()
    found = detect(detector, images)
    assert len(found) == 2 and all(len(d) <= 3 for d in found)
    assert blocker.attempts == [] and "torchvision" not in sys.modules
    from monai.apps.detection.networks import retinanet_detector

    assert retinanet_detector.Matcher is detection_shims.TorchvisionMatcherPlaceholder


def test_negative_images_train_through_hard_negatives() -> None:
    torch.manual_seed(0)
    detector = build_detector(TINY, num_classes=1)
    configure_for_training(detector, TINY)
    detector.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = detector(torch.rand(2, 1, 64, 64), [empty, dict(empty)])
    assert float(losses["classification"].detach()) > 0 and float(losses["box_regression"]) == 0
    losses["classification"].backward()
    head = detector.network.classification_head.cls_logits
    assert head.bias.grad is not None and float(head.bias.grad.abs().sum()) > 0


def test_state_dict_is_the_network_and_heads_are_shortened() -> None:
    detector = build_detector(TINY, num_classes=1)
    keys = list(detector.state_dict())
    assert keys and all(k.startswith("network.") for k in keys)
    assert not any(".layer3." in k or ".fc." in k for k in keys)  # only the returned stages
    assert len(detector.network.classification_head.conv) == 3  # one conv, norm, ReLU


# --------------------------------------------------------------------------------------------
# Bundles


def test_bundle_round_trip_gives_the_same_boxes(bundles: tuple[Path, Path],
                                                 radiograph: pydicom.Dataset) -> None:  # fmt: skip
    _, det = bundles
    meta = read_metadata(det)
    assert meta.task == "detection" and meta.network.name == "retinanet"
    doc = json.loads((det / METADATA_PATH).read_text())
    assert doc["gradcam_layer"] == "" and doc["network_data_format"]["outputs"]["pred"]["type"] == "object"
    loaded = load_bundle(det)
    image, _ = preprocess(radiograph, PreprocessParams(size=64))
    first = detect(loaded.model, torch.from_numpy(image[None]))[0]  # type: ignore[arg-type]
    again = detect(load_bundle(det).model, torch.from_numpy(image[None]))[0]  # type: ignore[arg-type]
    assert len(first) == 3 and np.allclose(first.boxes, again.boxes) and np.allclose(
        first.scores, again.scores)
    assert first.scores.min() > 0.99


def test_detection_metadata_is_validated(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    _, det = bundles
    doc = json.loads((det / METADATA_PATH).read_text())
    for edit, message in [
        ({"network": {"name": "densenet121", "args": {}}}, r'network.name = "densenet121" is not one of \[.retinanet.\]'),
        ({"network": {"name": "retinanet", "args": {"head_convs": 9}}}, r"network.args.head_convs"),
    ]:  # fmt: skip
        bad = tmp_path / "bad"
        (bad / METADATA_PATH).parent.mkdir(parents=True, exist_ok=True)
        (bad / METADATA_PATH).write_text(json.dumps({**doc, **edit}))
        with pytest.raises(BundleError, match=message):
            read_metadata(bad)


# --------------------------------------------------------------------------------------------
# The node: classifier + detector on one study


def test_analyzer_merges_detector_boxes_in_source_pixels(bundles: tuple[Path, Path],
                                                         radiograph: pydicom.Dataset) -> None:  # fmt: skip
    cls, det = bundles
    analyzer = Analyzer([cls, det], device="cpu")
    assert [m.task for m in analyzer.models] == ["classification", "detection"]
    (result,) = analyzer.analyze([radiograph])
    by_task = {t: [f for f in result.findings if f.model.task == t] for t in ("classification", "detection")}
    assert [f.label for f in by_task["classification"]] == ["nodule", "cardiomegaly", "pneumothorax"]
    boxes = by_task["detection"]
    assert len(boxes) == 3 and all(f.label == "nodule" and f.concept.value == "27925004" for f in boxes)
    assert all(f.positive and f.probability >= f.threshold == 0.5 for f in boxes)
    # the same boxes as the detector's own output mapped back through the letterbox
    image, letterbox = preprocess(radiograph, PreprocessParams(size=64))
    own = detect(load_bundle(det).model, torch.from_numpy(image[None]))[0]  # type: ignore[arg-type]
    expected = [letterbox.box_to_source(b.tolist()) for b in own.boxes]
    for finding, box in zip(boxes, expected, strict=True):
        assert box is not None and finding.box is not None
        assert np.allclose([finding.box.x0, finding.box.y0, finding.box.x1, finding.box.y1],
                           [box.x0, box.y0, box.x1, box.y1])  # fmt: skip
        assert 0 <= finding.box.x0 < finding.box.x1 <= 220 and 0 <= finding.box.y0 < finding.box.y1 <= 300
        assert all(type(v) is float for v in (finding.box.x0, finding.box.y1))


def test_below_threshold_boxes_are_reported_not_positive(tmp_path: Path,
                                                         radiograph: pydicom.Dataset) -> None:  # fmt: skip
    det = make_detector_bundle(tmp_path / "det", bias=0.0, threshold=0.9)  # scores about 0.5
    (result,) = Analyzer([det], device="cpu").analyze([radiograph])
    assert result.findings and not any(f.positive for f in result.findings)
    assert all(f.box is not None and 0.3 < f.probability < 0.9 for f in result.findings)


def test_outputs_carry_the_detector_boxes(bundles: tuple[Path, Path],
                                          radiograph: pydicom.Dataset) -> None:  # fmt: skip
    cls, det = bundles
    (result,) = Analyzer([cls, det], device="cpu").analyze([radiograph])
    det_boxes = [f.box for f in result.findings if f.model.task == "detection"]
    outputs = build_outputs([(radiograph, result)], OutputSettings(), "seed")
    kinds = {o.kind: o.dataset for o in outputs}
    sr_regions = [[float(v) for v in item.GraphicData] for item in _walk(kinds["sr"])
                  if item.get("ValueType") == "SCOORD"]  # fmt: skip
    for box in det_boxes:
        assert box is not None and any(np.allclose(r, _polyline(box), atol=0.01) for r in sr_regions)
    observers = {str(i.TextValue) for i in _walk(kinds["sr"]) if i.get("ValueType") == "TEXT"}
    assert any("tiny-test-detector" in text for text in observers)
    gsps_lines = [[float(v) for v in g.GraphicData] for a in kinds["gsps"].GraphicAnnotationSequence
                  for g in a.get("GraphicObjectSequence", [])]  # fmt: skip
    for box in det_boxes:
        assert any(np.allclose(line, _polyline(box), atol=0.01) for line in gsps_lines)
    # the SC burns the boxes in: compare with the classifier-only SC
    only_cls = ImageResult(result.sop_instance_uid, result.rows, result.columns,
                           [f for f in result.findings if f.model.task == "classification"],
                           result.heatmap, result.models)  # fmt: skip
    plain = {o.kind: o.dataset for o in build_outputs([(radiograph, only_cls)], OutputSettings(), "s")}
    diff = np.abs(kinds["sc"].pixel_array.astype(int) - plain["sc"].pixel_array.astype(int)).sum(-1)
    for box in det_boxes:
        assert box is not None
        edge = diff[int(box.y0) : int(math.ceil(box.y1)) + 1, max(int(box.x0) - 2, 0) : int(box.x0) + 3]
        assert edge.any(), f"no burnt-in edge at the left side of {box}"


def _polyline(box: BoundingBox | None) -> list[float]:
    assert box is not None
    return [v for point in box.polyline() for v in point]


def _walk(item: pydicom.Dataset):  # noqa: ANN202 - generator of content items
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


# --------------------------------------------------------------------------------------------
# The node's scheduled evaluation hook


def test_detection_figures_store_ap50_and_froc() -> None:
    from ai.types import Finding

    det = ModelIdentity("det", "1.0", "2.25.9", "detection")
    cls = ModelIdentity("cls", "1.0", "2.25.8", "classification")
    code = default_code("nodule")
    assert code is not None

    def f(model: ModelIdentity, p: float, box: BoundingBox | None = None) -> Finding:
        return Finding("nodule", code, p, 0.5, p >= 0.5, model, box)

    results = [
        ImageResult("1.1", 100, 100, [f(det, 0.9, BoundingBox(10, 10, 20, 20)), f(cls, 0.2)]),
        ImageResult("1.2", 100, 100, [f(det, 0.7, BoundingBox(60, 60, 70, 70))]),  # false positive
        ImageResult("1.3", 100, 100, [f(det, 0.3, BoundingBox(40, 40, 52, 50))]),  # below threshold
        ImageResult("1.4", 100, 100, []),  # not in the reference: not evaluated
    ]
    truth = {"1.1": [("Nodule", 10.0, 10.0, 20.0, 20.0)], "1.2": [], "1.3": [("nodule", 40, 40, 50, 50)]}
    (fig,) = detection_figures(results, truth)
    assert (fig.model_name, fig.label, fig.threshold) == ("det", "nodule", 0.5)
    # boxes by score: 0.9 TP, 0.7 FP, 0.3 TP (IoU 100/120); envelope 1 to recall 1/2, 2/3 after
    assert fig.ap50 == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert fig.froc is not None and dict(fig.froc)[0.125] == pytest.approx(0.5)
    assert dict(fig.froc)[0.5] == pytest.approx(1.0)
    # image level: 1.1 TP, 1.2 FP, 1.3 FN (box below threshold)
    assert (fig.tp, fig.fp, fig.tn, fig.fn) == (1, 1, 0, 1)
    assert fig.as_dict()["froc"][0] == [0.125, 0.5]
    truth2 = reference_boxes({"a/x.dcm": ["0 0.15 0.15 0.1 0.1"], "y.dcm": []},
                             [("1.1", "a/x.dcm", 100, 100), ("1.2", "b/y.dcm", 100, 100),
                              ("1.3", "z.dcm", 100, 100)], ["nodule"])  # fmt: skip
    assert truth2 == {"1.1": [("nodule", 10.0, 10.0, 20.0, 20.0)], "1.2": []}
