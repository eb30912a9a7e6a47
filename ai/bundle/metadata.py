"""A model bundle's ``configs/metadata.json``, read and validated without torch (the web
shows bundle metadata and must not import torch; ``tests/unit/ai/test_bundle_metadata.py``
checks that importing this module does not).

``metadata.json`` carries the standard MONAI keys (``version``, ``monai_version``,
``network_data_format``, ...) so MONAI tooling recognises the bundle, plus this project's
keys: labels with coded concepts and operating thresholds, input preprocessing, network
name and arguments, Grad-CAM layer, device UID and the training / validation record.

The weights (``models/model.pt``) are saved and loaded by :mod:`ai.bundle.load`.

The device UID (the SR's device observer) is derived from name, version and the weights
hash: the same bundle always reports the same UID, and a new version or new weights get a
new one, as IHE AI Results asks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ai.bundle.architectures import (
    DETECTION_NETWORKS,
    RetinaNetSpec,
    default_gradcam_layer,
    network_names,
)
from ai.bundle.gate import check_summary
from ai.codes import default_code
from ai.pixels import DEFAULT_MAX_PIXELS, PreprocessParams
from ai.types import BundleError, CodedConcept, ModelIdentity
from ai.uids import is_valid_uid

logger = logging.getLogger(__name__)

METADATA_PATH = Path("configs") / "metadata.json"
WEIGHTS_PATH = Path("models") / "model.pt"
MONAI_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json"
)
TASKS = ("classification", "detection")


# --------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class LabelSpec:
    """One output of the model: its name, coded concept and operating threshold."""

    name: str
    code: CodedConcept
    threshold: float = 0.5

    def to_json(self) -> dict[str, Any]:
        code = {"value": self.code.value, "scheme": self.code.scheme, "meaning": self.code.meaning}
        return {"name": self.name, "code": code, "threshold": self.threshold}


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: square size, channels, and the preprocessing options.

    ``channels`` 3 repeats the grey image (models pretrained on ImageNet); ``mean`` / ``std``
    (one value per channel) rescale the [0, 1] image as ``(x - mean) / std``, so a public
    model gets the input space it was trained in. Bundles that leave them at the defaults
    (1 channel, [0, 1]) write no ``mean`` / ``std`` keys.
    """

    size: int = 224
    channels: int = 1
    clahe: bool = False
    percentile_window: tuple[float, float] = (0.5, 99.5)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "size": self.size,
            "channels": self.channels,
            "clahe": self.clahe,
            "percentile_window": list(self.percentile_window),
        }
        if (self.mean, self.std) != ((0.0,), (1.0,)):
            doc["mean"], doc["std"] = list(self.mean), list(self.std)
        return doc

    @property
    def value_range(self) -> tuple[float, float]:
        """The range of the model input values (over all channels)."""
        ends = [(v - m) / s for m, s in zip(self.mean, self.std, strict=True) for v in (0.0, 1.0)]
        return min(ends), max(ends)

    def preprocess_params(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreprocessParams:
        return PreprocessParams(
            size=self.size,
            clahe=self.clahe,
            percentile_window=self.percentile_window,
            max_pixels=max_pixels,
            channels=self.channels,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class NetworkSpec:
    """A :mod:`ai.networks` name and its extra constructor arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "args": _jsonable(self.args)}


@dataclass(frozen=True)
class BundleMetadata:
    """Everything the node needs to know about a model, as ``configs/metadata.json`` holds it.

    ``device_uid``, ``created`` and ``weights_sha256`` may be left empty: :func:`save_bundle`
    fills them. ``gradcam_layer`` empty means the network's default.
    """

    name: str
    version: str
    labels: tuple[LabelSpec, ...]
    network: NetworkSpec
    task: str = "classification"
    multi_label: bool = True
    input: InputSpec = field(default_factory=InputSpec)
    gradcam_layer: str = ""
    device_uid: str = ""
    manufacturer: str = "CXR AI node"
    demo: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    description: str = ""
    authors: str = ""
    weights_sha256: str = ""
    ood: dict[str, Any] = field(default_factory=dict)  # the gate (ai.bundle.gate); {}: none

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def target_layer(self) -> str:
        """Grad-CAM layer; empty for detection (the detector's boxes localise)."""
        if self.task == "detection":
            return self.gradcam_layer
        return self.gradcam_layer or default_gradcam_layer(self.network.name)

    def identity(self) -> ModelIdentity:
        return ModelIdentity(
            name=self.name,
            version=self.version,
            device_uid=self.device_uid,
            task=self.task,
            manufacturer=self.manufacturer,
            demo=self.demo,
            ood_gate=bool(self.ood),
        )

    def to_json(self) -> dict[str, Any]:
        """The metadata.json document: MONAI's standard keys first, then the node's own.

        Records the installed MONAI and PyTorch versions, so it imports them: only writing
        a bundle (the torch side) needs this, reading metadata does not."""
        import monai
        import torch

        return {
            "schema": MONAI_SCHEMA,
            "version": self.version,
            "changelog": {self.version: self.description or f"{self.name} {self.version}"},
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "required_packages_version": {},
            "task": self.task,
            "description": self.description,
            "authors": self.authors or self.manufacturer,
            "copyright": "",
            "network_data_format": self._network_data_format(),
            "name": self.name,
            "labels": [label.to_json() for label in self.labels],
            "multi_label": self.multi_label,
            "input": self.input.to_json(),
            "network": self.network.to_json(),
            "gradcam_layer": self.target_layer,
            "device_uid": self.device_uid,
            "manufacturer": self.manufacturer,
            "demo": self.demo,
            "training": _jsonable(self.training),
            "validation_metrics": _jsonable(self.validation_metrics),
            "created": self.created,
            "weights_sha256": self.weights_sha256,
            **({"ood": _jsonable(self.ood)} if self.ood else {}),
        }

    def _network_data_format(self) -> dict[str, Any]:
        channel_def = {str(i): label.name for i, label in enumerate(self.labels)}
        if self.task == "detection":
            pred = {
                "type": "object",
                "format": "boxes (x0, y0, x1, y1) in model pixels, label index, score",
                "num_channels": len(self.labels),
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_onehot": False,
                "activation": "sigmoid",
                "channel_def": channel_def,
            }
            return {"inputs": self._image_input(self.input), "outputs": {"pred": pred}}
        return {
            "inputs": self._image_input(self.input),
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(self.labels),
                    "spatial_shape": [1, len(self.labels)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "activation": "sigmoid" if self.multi_label else "softmax",
                    "channel_def": channel_def,
                }
            },
        }

    @staticmethod
    def _image_input(spec: InputSpec) -> dict[str, Any]:
        lo, hi = spec.value_range
        return {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "XR",
                "num_channels": spec.channels,
                "spatial_shape": [spec.size, spec.size],
                "dtype": "float32",
                "value_range": [0, 1] if (lo, hi) == (0.0, 1.0) else [lo, hi],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        }

    @classmethod
    def from_json(cls, doc: Any) -> BundleMetadata:
        """Parse and validate a metadata document; errors name the key and the bad value."""
        return _parse_metadata(doc)


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (tuples -> lists, NumPy scalars -> Python), or a BundleError."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise BundleError(f"Value {value!r} of type {type(value).__name__} cannot go into JSON")


# --------------------------------------------------------------------------------------------
# Validation helpers: each names the key path and the bad value


def _get(doc: Mapping[str, Any], key: str, path: str, default: Any = ...) -> Any:
    if key in doc:
        return doc[key]
    if default is ...:
        raise BundleError(f"metadata.json: missing key {path}{key}")
    return default


def _str(doc: Mapping[str, Any], key: str, path: str = "", default: Any = ...) -> str:
    value = _get(doc, key, path, default)
    if not isinstance(value, str) or (default is ... and not value.strip()):
        raise BundleError(f'metadata.json: {path}{key} = "{value}" must be a non-empty string')
    return value


def _bool(doc: Mapping[str, Any], key: str, path: str = "", default: Any = ...) -> bool:
    value = _get(doc, key, path, default)
    if not isinstance(value, bool):
        raise BundleError(f'metadata.json: {path}{key} = "{value}" must be true or false')
    return value


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BundleError(f'metadata.json: {where} = "{value}" must be a number in [{lo}, {hi}]')
    return float(value)


def _dict(doc: Mapping[str, Any], key: str, path: str = "", default: Any = ...) -> dict:
    value = _get(doc, key, path, default)
    if not isinstance(value, dict):
        raise BundleError(f'metadata.json: {path}{key} = "{value}" must be an object')
    return value


def _parse_label(item: Any, index: int) -> LabelSpec:
    where = f"labels[{index}]."
    if not isinstance(item, dict):
        raise BundleError(f'metadata.json: labels[{index}] = "{item}" must be an object')
    name = _str(item, "name", where)
    threshold = _number(_get(item, "threshold", where, 0.5), f"{where}threshold", 0.0, 1.0)
    raw_code = item.get("code")
    if raw_code is None:
        code = default_code(name)
        if code is None:
            raise BundleError(
                f'metadata.json: {where}code missing and label "{name}" has no default'
            )
    else:
        if not isinstance(raw_code, dict):
            raise BundleError(f'metadata.json: {where}code = "{raw_code}" must be an object')
        code = CodedConcept(
            value=_str(raw_code, "value", f"{where}code."),
            scheme=_str(raw_code, "scheme", f"{where}code."),
            meaning=_str(raw_code, "meaning", f"{where}code."),
        )
    return LabelSpec(name=name, code=code, threshold=threshold)


def _parse_labels(doc: Mapping[str, Any]) -> tuple[LabelSpec, ...]:
    raw = _get(doc, "labels", "")
    if not isinstance(raw, list) or not raw:
        raise BundleError(f'metadata.json: labels = "{raw}" must be a non-empty list')
    labels = tuple(_parse_label(item, i) for i, item in enumerate(raw))
    names = [label.name for label in labels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BundleError(f"metadata.json: labels has duplicate names {duplicates}")
    return labels


def _parse_input(doc: Mapping[str, Any]) -> InputSpec:
    raw = _dict(doc, "input", "")
    size = _get(raw, "size", "input.")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096:
        raise BundleError(f'metadata.json: input.size = "{size}" must be an integer in [16, 4096]')
    channels = _get(raw, "channels", "input.", 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise BundleError(f'metadata.json: input.channels = "{channels}" must be 1 or 3')
    mean = _per_channel(raw, "mean", channels, 0.0)
    std = _per_channel(raw, "std", channels, 1.0)
    if any(s <= 0 for s in std):
        raise BundleError(f'metadata.json: input.std = "{list(std)}" must be positive')
    window = _get(raw, "percentile_window", "input.", [0.5, 99.5])
    if not isinstance(window, list | tuple) or len(window) != 2:
        raise BundleError(f'metadata.json: input.percentile_window = "{window}" must be [lo, hi]')
    lo = _number(window[0], "input.percentile_window[0]", 0.0, 100.0)
    hi = _number(window[1], "input.percentile_window[1]", 0.0, 100.0)
    if lo >= hi:
        raise BundleError(f'metadata.json: input.percentile_window = "{window}" needs lo < hi')
    return InputSpec(size=size, channels=channels, clahe=_bool(raw, "clahe", "input.", False),
                     percentile_window=(lo, hi), mean=mean, std=std)  # fmt: skip


def _per_channel(raw: Mapping[str, Any], key: str, channels: int, default: float) -> tuple[float, ...]:
    """``input.mean`` / ``input.std``: one number per channel (absent: ``default`` for each)."""
    value = _get(raw, key, "input.", [default] * channels)
    if not isinstance(value, list | tuple) or len(value) != channels:
        raise BundleError(f'metadata.json: input.{key} = "{value}" must list {channels} number(s)')
    return tuple(_number(v, f"input.{key}[{i}]", -1e6, 1e6) for i, v in enumerate(value))


def _parse_network(doc: Mapping[str, Any], task: str = "classification") -> NetworkSpec:
    raw = _dict(doc, "network", "")
    name = _str(raw, "name", "network.")
    if task == "detection":
        if name not in DETECTION_NETWORKS:
            raise BundleError(f'metadata.json: network.name = "{name}" is not one of '
                              f'{list(DETECTION_NETWORKS)} (task "detection")')  # fmt: skip
        args = _dict(raw, "args", "network.", {})
        try:
            RetinaNetSpec.from_args(args)
        except BundleError as exc:
            raise BundleError(f"metadata.json: {exc}") from exc
        return NetworkSpec(name=name, args=args)
    if name not in network_names():
        raise BundleError(f'metadata.json: network.name = "{name}" is not one of {network_names()}')
    return NetworkSpec(name=name, args=_dict(raw, "args", "network.", {}))


def _parse_uid(doc: Mapping[str, Any]) -> str:
    uid = _str(doc, "device_uid", "", "")
    if uid and not is_valid_uid(uid, "strict", min_components=2):
        raise BundleError(f'metadata.json: device_uid = "{uid}" is not a valid DICOM UID')
    return uid


def _parse_created(doc: Mapping[str, Any]) -> str:
    created = _str(doc, "created", "", "")
    if created:
        try:
            datetime.fromisoformat(created)
        except ValueError as exc:
            raise BundleError(f'metadata.json: created = "{created}" is not an ISO time') from exc
    return created


def _parse_metadata(doc: Any) -> BundleMetadata:
    if not isinstance(doc, dict):
        raise BundleError("metadata.json: the document must be a JSON object")
    task = _str(doc, "task")
    if task not in TASKS:
        raise BundleError(f'metadata.json: task = "{task}" must be one of {list(TASKS)}')
    network = _parse_network(doc, task)
    gradcam = _str(doc, "gradcam_layer", "", "")
    if task == "classification":
        gradcam = gradcam or default_gradcam_layer(network.name)
    return BundleMetadata(
        name=_str(doc, "name"),
        version=_str(doc, "version"),
        task=task,
        labels=_parse_labels(doc),
        multi_label=_bool(doc, "multi_label", "", True),
        input=_parse_input(doc),
        network=network,
        gradcam_layer=gradcam,
        device_uid=_parse_uid(doc),
        manufacturer=_str(doc, "manufacturer", "", "CXR AI node"),
        demo=_bool(doc, "demo", "", False),
        training=_dict(doc, "training", "", {}),
        validation_metrics=_dict(doc, "validation_metrics", "", {}),
        created=_parse_created(doc),
        description=_str(doc, "description", "", ""),
        authors=_str(doc, "authors", "", ""),
        weights_sha256=_str(doc, "weights_sha256", "", ""),
        ood=check_summary(doc.get("ood", {})),
    )


def read_metadata(directory: Path) -> BundleMetadata:
    """Parse and validate ``configs/metadata.json`` of a bundle directory."""
    path = Path(directory) / METADATA_PATH
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"Bundle {directory}: missing {METADATA_PATH}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"Bundle {directory}: unreadable {METADATA_PATH}: {exc}") from exc
    return BundleMetadata.from_json(doc)
