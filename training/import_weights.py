"""``training import-weights``: a public chest X-ray checkpoint -> a bundle the node runs.

Two source layouts are understood, both DenseNet121:

* ``torchvision-densenet121``: CheXNet re-implementations (arnoweng/CheXNet and its many
  forks) save torchvision's DenseNet121 ``state_dict``, often wrapped (``module.`` from
  ``DataParallel``, ``densenet121.`` from a wrapper module, ``{"state_dict": ...}`` around
  it), with old torchvision names (``denselayer1.norm.1.weight`` for ``norm1``) and a
  ``classifier.0`` Linear followed by a Sigmoid. Input: 3 channels (the grey image
  repeated), ImageNet mean / std, 224 px.
* ``torchxrayvision-densenet121``: ``xrv.models.DenseNet`` (same module names as
  torchvision, one input channel, ``classifier`` Linear with 18 outputs in
  ``xrv.datasets.default_pathologies`` order, an optional ``op_threshs`` buffer holding
  each output's operating threshold, NaN for outputs the model was not trained on). Input:
  one channel scaled to [-1024, 1024], 224 px.

Names are converted to MONAI's DenseNet121 (``denselayerN.layers.norm1``,
``class_layers.out``) as :func:`monai.networks.nets.densenet._load_state_dict` does for
torchvision's hub weights, but strictly: an unknown key, a missing tensor or a shape that
does not fit is an error naming it, never silently skipped. The node applies the sigmoid
itself, so the output is the Linear layer's logits (CheXNet's Sigmoid has no weights).

Thresholds come from ``op_threshs`` (torchxrayvision), from ``--thresholds``, or stay 0.5
and the bundle says it was never calibrated: run ``training calibrate`` on local data.
The release files of torchxrayvision are pickled modules; they are refused (unpickling runs
code), with the one-line conversion to a state dict in the message.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from ai.bundle.gate import DEFAULT_QUANTILE
from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
from ai.networks import build_network
from training.densenet_keys import monai_key
from training.errors import TrainingError
from training.export import ExportOutcome, stage_bundle
from training.fit.engine import label_code
from training.ood import gate_bundle, image_files, split_files

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_MEAN, XRV_STD = (0.5,), (1.0 / 2048.0,)  # [0, 1] -> [-1024, 1024], xrv.datasets.normalize

CHEXNET_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
"""The 14 ChestX-ray14 labels in the order of the CheXNet paper and its re-implementations."""

XRV_LABELS = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
    "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)  # fmt: skip
"""``xrv.datasets.default_pathologies``: the output order of torchxrayvision's DenseNets."""


class ImportWeightsError(TrainingError, ValueError):
    """The checkpoint cannot be turned into a bundle (unreadable, wrong layout, bad labels)."""


@dataclass(frozen=True)
class SourceFormat:
    """A public checkpoint layout: its input convention and default output labels."""

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    bundle_name: str
    description: str


FORMATS: dict[str, SourceFormat] = {
    "torchvision-densenet121": SourceFormat(
        "torchvision-densenet121", 3, IMAGENET_MEAN, IMAGENET_STD, CHEXNET_LABELS,
        "chexnet-densenet121",
        "DenseNet121 in torchvision's layout (CheXNet re-implementation), imported",
    ),
    "torchxrayvision-densenet121": SourceFormat(
        "torchxrayvision-densenet121", 1, XRV_MEAN, XRV_STD, XRV_LABELS, "xrv-densenet121",
        "torchxrayvision DenseNet121, imported",
    ),
}  # fmt: skip

@dataclass
class ConvertedWeights:
    """The MONAI DenseNet121 holding the checkpoint's weights (every output), the
    per-output thresholds the file carried, and notes."""

    model: nn.Module
    outputs: int
    in_channels: int
    thresholds: list[float] | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading and converting


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a state dict, or one under ``state_dict`` /
    ``model_state_dict`` / ``model`` (training scripts wrap it with epoch and optimiser)."""
    path = Path(path)
    if not path.is_file():
        raise ImportWeightsError(f'--weights "{path}" is not a file')
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ImportWeightsError(
            f'--weights "{path}" holds pickled objects, not a state dict (a torchxrayvision '
            "release file is a whole module). Convert it where the source library is "
            "installed: torch.save(xrv.models.DenseNet(weights=...).state_dict(), 'file.pt')"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ImportWeightsError(f'--weights "{path}": not a PyTorch checkpoint ({exc})') from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(doc, Mapping) and isinstance(doc.get(key), Mapping):
            doc = doc[key]
            break
    if not isinstance(doc, Mapping) or not doc:
        raise ImportWeightsError(f'--weights "{path}" holds no state dict')
    tensors = {str(k): v for k, v in doc.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(doc):
        odd = sorted(str(k) for k, v in doc.items() if not isinstance(v, torch.Tensor))[:5]
        raise ImportWeightsError(f'--weights "{path}": entries that are not tensors: {odd}')
    return tensors


def convert_state_dict(source: Mapping[str, torch.Tensor], fmt: SourceFormat) -> ConvertedWeights:
    """Rename ``source`` to MONAI's DenseNet121 and check it is complete and fits."""
    state: dict[str, torch.Tensor] = {}
    thresholds = None
    for key, tensor in source.items():
        new = monai_key(key)
        if new is None:
            thresholds = [float(v) for v in tensor.flatten().tolist()]
            continue
        if new in state:
            raise ImportWeightsError(f'two checkpoint keys map to "{new}" (e.g. "{key}")')
        state[new] = tensor
    weight = state.get("class_layers.out.weight")
    conv0 = state.get("features.conv0.weight")
    if weight is None or conv0 is None:
        raise ImportWeightsError(
            f"not a {fmt.name} checkpoint: no classifier or features.conv0 weight "
            f"(first keys: {sorted(source)[:3]})"
        )
    outputs, channels = int(weight.shape[0]), int(conv0.shape[1])
    if channels != fmt.channels:
        raise ImportWeightsError(f"{fmt.name} expects {fmt.channels} input channel(s); "
                                 f"features.conv0.weight has {channels}")  # fmt: skip
    model = build_network("densenet121", num_classes=outputs, in_channels=channels).module
    expected = model.state_dict()
    notes = _fill_counters(state, expected)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise ImportWeightsError(
            f"checkpoint does not fit DenseNet121 ({fmt.name}): unknown keys {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''}, missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ImportWeightsError(f'"{key}" has shape {tuple(tensor.shape)}, DenseNet121 '
                                     f"needs {tuple(expected[key].shape)}")  # fmt: skip
    if thresholds is not None and len(thresholds) != outputs:
        raise ImportWeightsError(f"op_threshs has {len(thresholds)} values for {outputs} outputs")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return ConvertedWeights(model, outputs, channels, thresholds, notes)


def _fill_counters(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Old checkpoints predate BatchNorm's ``num_batches_tracked`` (unused in eval): zeros."""
    absent = [k for k in expected if k.endswith("num_batches_tracked") and k not in state]
    for key in absent:
        state[key] = torch.zeros_like(expected[key])
    return [f"{len(absent)} BatchNorm num_batches_tracked counters absent (set to 0)"] if absent else []


# --------------------------------------------------------------------------------------------
# Labels and thresholds


def parse_labels(text: str | None, fmt: SourceFormat) -> tuple[str, ...]:
    """``--labels``: comma-separated names in output order (an empty name skips that output),
    or ``@FILE`` with one per line; default: the format's usual order."""
    if text is None:
        return fmt.labels
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ImportWeightsError(f'--labels "{text}": cannot read {path} ({exc})') from exc
    else:
        names = text.split(",")
    return tuple(n.strip() for n in names)


def select_outputs(labels: Sequence[str], weights: ConvertedWeights,
                   thresholds: Sequence[float] | None) -> list[tuple[int, str, float | None]]:  # fmt: skip
    """``(output index, label, threshold or None)`` of the outputs the bundle keeps: those
    with a name and, where the file has thresholds, a finite one (NaN marks an output
    torchxrayvision never trained)."""
    if len(labels) != weights.outputs:
        raise ImportWeightsError(f"--labels names {len(labels)} output(s); the checkpoint "
                                 f"has {weights.outputs}")  # fmt: skip
    given = list(thresholds) if thresholds is not None else weights.thresholds
    if given is not None and len(given) != weights.outputs:
        raise ImportWeightsError(f"--thresholds has {len(given)} values for {weights.outputs} outputs")
    kept = []
    for index, name in enumerate(labels):
        value = None if given is None else given[index]
        if not name:
            continue
        if value is not None and not math.isfinite(value):
            weights.notes.append(f'output {index} "{name}" dropped: no threshold (untrained)')
            continue
        if value is not None and not 0.0 < value < 1.0:
            raise ImportWeightsError(f'threshold {value} of "{name}" is not within (0, 1)')
        kept.append((index, name, value))
    names = [name for _, name, _ in kept]
    if not kept:
        raise ImportWeightsError("no output left to import (all names empty or untrained)")
    if len(set(names)) != len(names):
        raise ImportWeightsError(f"--labels repeats a name: {names}")
    return kept


def _keep_rows(model: nn.Module, rows: list[int]) -> nn.Module:
    """The network with only the classifier rows ``rows`` (the outputs the bundle keeps)."""
    old = model.class_layers.out
    new = nn.Linear(old.in_features, len(rows))
    index = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        new.weight.copy_(old.weight.index_select(0, index))
        new.bias.copy_(old.bias.index_select(0, index))
    model.class_layers.out = new
    return model


# --------------------------------------------------------------------------------------------
# The command


def import_weights(
    fmt_name: str,
    weights: Path,
    out: Path,
    *,
    labels: str | None = None,
    thresholds: Sequence[float] | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    description: str | None = None,
    check_dicom: Path | None = None,
    force: bool = False,
    ood_images: Path | None = None,
    ood_quantile: float = DEFAULT_QUANTILE,
) -> ExportOutcome:
    """Convert ``weights`` (layout ``fmt_name``) into a bundle at ``out`` and load it back
    as the node does (and run it on ``check_dicom`` when given). ``ood_images``: a folder of
    the user's own DICOM images, on which the out-of-distribution gate is fitted."""
    if fmt_name not in FORMATS:
        raise ImportWeightsError(f'--format "{fmt_name}" is not one of {sorted(FORMATS)}')
    fmt = FORMATS[fmt_name]
    out = Path(out)
    if out.exists() and not force:
        raise ImportWeightsError(f'--out "{out}" exists; add --force to replace it')
    converted = convert_state_dict(read_checkpoint(weights), fmt)
    kept = select_outputs(parse_labels(labels, fmt), converted, thresholds)
    model = _keep_rows(converted.model, [index for index, _, _ in kept])
    specs = tuple(LabelSpec(label, label_code(label), 0.5 if t is None else t)
                  for _, label, t in kept)  # fmt: skip
    calibrated = all(t is not None for _, _, t in kept)
    record = {
        "imported": {
            "format": fmt.name,
            "file": Path(weights).name,
            "sha256": _sha256(Path(weights)),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "outputs": {label: index for index, label, _ in kept},
            "thresholds": "from the file or --thresholds" if calibrated else "0.5, uncalibrated",
            "notes": converted.notes,
        }
    }
    if calibrated:
        record["calibration"] = {"method": "imported", "source": fmt.name}
    meta = BundleMetadata(
        name=name or fmt.bundle_name,
        version=version,
        labels=specs,
        network=NetworkSpec("densenet121"),
        input=InputSpec(size=224, channels=fmt.channels, mean=fmt.mean, std=fmt.std),
        training=record,
        description=description or fmt.description,
    )
    warnings = list(converted.notes)
    if not calibrated:
        warnings.append("thresholds are 0.5: run training calibrate on local labelled data")
    warnings.append("no validation metrics: run training evaluate on local labelled data")
    logger.info("import-weights %s: %d output(s) kept of %d", fmt.name, len(kept), converted.outputs)
    fit = None
    if ood_images is not None:
        fit_files, val_files = split_files(image_files(ood_images))

        def fit(staging: Path) -> None:
            gate_bundle(staging, fit_files, val_files, quantile=ood_quantile,
                        fitted_on=f"{len(fit_files) + len(val_files)} images of {ood_images.name}")
    else:
        warnings.append("no out-of-distribution gate: give --ood-images to fit one")
    return stage_bundle(model, meta, out, warnings, check_dicom, fit_gate=fit)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
