"""Bundles: round trip, MONAI keys, identity, and validation errors that name key and value."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from aihelpers import LABELS, make_bundle
from pydicom.uid import UID

from ai.bundle.load import load_bundle
from ai.bundle.metadata import METADATA_PATH, WEIGHTS_PATH, BundleMetadata, read_metadata
from ai.codes import DEFAULT_CODES
from ai.types import BundleError


def test_round_trip(tmp_path: Path) -> None:
    written = make_bundle(tmp_path / "b", thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    loaded = load_bundle(tmp_path / "b")
    assert loaded.metadata == written
    assert loaded.metadata.label_names == list(LABELS)
    assert [label.threshold for label in loaded.metadata.labels] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert loaded.metadata.labels[1].code == DEFAULT_CODES["cardiomegaly"]
    assert loaded.identity.device_uid == written.device_uid and UID(written.device_uid).is_valid
    assert loaded.identity.task == "classification"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    x = torch.rand(1, 1, 64, 64)
    assert loaded.model(x).shape == (1, 5)


def test_metadata_has_monai_keys(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / METADATA_PATH).read_text())
    for key in ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                "task", "description", "authors", "network_data_format", "changelog"):  # fmt: skip
        assert key in doc, key
    fmt = doc["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert fmt["outputs"]["pred"]["channel_def"]["1"] == "cardiomegaly"
    assert len(doc["weights_sha256"]) == 64


def test_device_uid_is_new_per_version_and_stable(tmp_path: Path) -> None:
    a = make_bundle(tmp_path / "a", version="1.0.0")
    b = make_bundle(tmp_path / "b", version="1.0.0")
    c = make_bundle(tmp_path / "c", version="1.1.0")
    assert a.device_uid == b.device_uid  # same name, version and weights
    assert c.device_uid != a.device_uid


def _edit(bundle: Path, change: Any) -> None:
    path = bundle / METADATA_PATH
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(task="segmentation"), 'task = "segmentation"'),
        (lambda d: d["labels"][2].update(threshold=1.5), r'labels\[2\].threshold = "1.5"'),
        (lambda d: d["labels"][0].update(threshold="high"), r'labels\[0\].threshold = "high"'),
        (lambda d: d.update(labels=[]), "labels"),
        (lambda d: d["labels"][1].update(name="nodule"), "duplicate names"),
        (lambda d: d["labels"][0]["code"].pop("scheme"), r"labels\[0\].code.scheme"),
        (lambda d: d["network"].update(name="vgg16"), 'network.name = "vgg16"'),
        (lambda d: d["input"].update(size="224"), 'input.size = "224"'),
        (lambda d: d["input"].update(channels=2), 'input.channels = "2"'),
        (lambda d: d["input"].update(channels=3, mean=[0.5]), r'input.mean = "\[0.5\]" must list 3'),
        (lambda d: d["input"].update(mean=[0.5], std=[0.0]), r'input.std = "\[0.0\]" must be positive'),
        (lambda d: d["input"].update(percentile_window=[50, 10]), "needs lo < hi"),
        (lambda d: d.update(device_uid="1.2.abc"), 'device_uid = "1.2.abc"'),
        (lambda d: d.update(multi_label="yes"), 'multi_label = "yes"'),
        (lambda d: d.update(created="yesterday"), 'created = "yesterday"'),
        (lambda d: d.pop("name"), "missing key name"),
        (lambda d: d.update(gradcam_layer="features.nope"), 'gradcam_layer "features.nope"'),
        (lambda d: d["network"]["args"].update(growth_rate="x"), "rejects args"),
    ],
)
def test_validation_errors_name_key_and_value(
    random_bundle: Path, tmp_path: Path, change: Any, message: str
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    _edit(bundle, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_code_gets_default(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    _edit(bundle, lambda d: d["labels"][3].pop("code"))
    assert read_metadata(bundle).labels[3].code == DEFAULT_CODES["pneumothorax"]


def test_detection_task_needs_a_detection_network(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    _edit(bundle, lambda d: d.update(task="detection"))
    with pytest.raises(BundleError, match=r'network.name = "densenet" .*task "detection"'):
        load_bundle(bundle)


def test_not_json(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    (bundle / METADATA_PATH).write_text("{nope")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(bundle)


def test_missing_files(random_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="missing configs/metadata.json"):
        load_bundle(tmp_path / "nothing")
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    (bundle / WEIGHTS_PATH).unlink()
    with pytest.raises(BundleError, match="missing models/model.pt"):
        load_bundle(bundle)


def test_swapped_weights_refused(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    other = make_bundle(tmp_path / "other", seed=1)
    assert other.weights_sha256 != read_metadata(bundle).weights_sha256
    shutil.copy(tmp_path / "other" / WEIGHTS_PATH, bundle / WEIGHTS_PATH)
    with pytest.raises(BundleError, match="does not match weights_sha256"):
        load_bundle(bundle)


def test_weights_that_do_not_fit(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    _edit(bundle, lambda d: (d["labels"].pop(), d.update(weights_sha256="")))
    with pytest.raises(BundleError, match="does not fit the network"):
        load_bundle(bundle)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("code ran",))


def test_pickled_code_is_not_executed(random_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(random_bundle, bundle)
    (bundle / WEIGHTS_PATH).write_bytes(pickle.dumps({"x": _Evil()}))
    _edit(bundle, lambda d: d.update(weights_sha256=""))
    with pytest.raises(BundleError, match="cannot load"):
        load_bundle(bundle)


def test_save_refuses_non_json_training_record(tmp_path: Path) -> None:
    meta = make_bundle(tmp_path / "a")
    bad = BundleMetadata(**{**vars(meta), "training": {"when": object()}})
    from ai.bundle.load import save_bundle

    with pytest.raises(BundleError, match="cannot go into JSON"):
        save_bundle(tmp_path / "b", bad, load_bundle(tmp_path / "a").model)
