"""Saving and loading model bundles: the torch side of :mod:`ai.bundle`.

``model.pt`` is a plain ``state_dict`` loaded with ``weights_only=True``: a bundle from a
PACS share must not be able to run code in the node. Its SHA-256 sits in the metadata so a
swapped or truncated weights file is refused instead of silently changing the results.
The metadata itself (:mod:`ai.bundle.metadata`) is read without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydicom.uid import generate_uid
from torch import nn

from ai.bundle.gate import GATE_PATH, OodGate, gate_file_bytes, read_gate
from ai.bundle.metadata import METADATA_PATH, WEIGHTS_PATH, BundleMetadata, read_metadata
from ai.detection import build_detector
from ai.networks import build_network, find_layer
from ai.types import BundleError, ModelIdentity

logger = logging.getLogger(__name__)


@dataclass
class LoadedBundle:
    """A validated bundle ready to run: its metadata, the network in eval mode, its identity."""

    metadata: BundleMetadata
    model: nn.Module
    identity: ModelIdentity
    path: Path | None = None
    gate: OodGate | None = None  # the out-of-distribution gate, when the bundle has one


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a bundle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_model(metadata: BundleMetadata) -> nn.Module:
    """The bundle's network, freshly initialised (weights come from :func:`load_bundle`)."""
    if metadata.task == "detection":
        try:
            return build_detector(metadata.network.args, num_classes=len(metadata.labels))
        except BundleError as exc:
            raise BundleError(f'Bundle "{metadata.name}" (task "detection"): {exc}') from exc
    built = build_network(metadata.network.name, metadata.network.args,
                          num_classes=len(metadata.labels), in_channels=metadata.input.channels)  # fmt: skip
    find_layer(built.module, metadata.target_layer)
    return built.module


def _load_state(model: nn.Module, state: Any, where: str) -> None:
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise BundleError(f"{where}: expected a state_dict (mapping of name -> tensor)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{where} does not fit the network: {exc}") from exc


def save_bundle(directory: Path, metadata: BundleMetadata, model: nn.Module, *,
                gate: OodGate | None = None) -> BundleMetadata:
    """Write ``model``'s weights and ``metadata`` as a bundle; returns the metadata written.

    Fills ``weights_sha256``, ``created`` (when empty) and ``device_uid`` (when empty, derived
    from name, version and weights). The weights are checked against a freshly built network
    first, so a bundle that cannot load is never written. ``gate`` (fitted for these
    weights) is written as :data:`ai.bundle.gate.GATE_PATH` and described in ``ood``;
    without one the metadata's ``ood`` section is dropped (it would name a missing file).
    """
    directory = Path(directory)
    metadata = BundleMetadata.from_json(metadata.to_json())  # same validation as loading
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _load_state(build_model(metadata), state, "model")
    weights = directory / WEIGHTS_PATH
    _atomic_write(weights, lambda fh: torch.save(state, fh))
    sha = _sha256(weights)
    ood: dict[str, Any] = {}
    if gate is not None:
        if gate.weights_sha256 and gate.weights_sha256 != sha:
            raise BundleError("the ood gate was fitted for other weights than these")
        gate = replace(gate, weights_sha256=sha)
        data, gate_sha = gate_file_bytes(gate)
        _atomic_write(directory / GATE_PATH, lambda fh: fh.write(data))
        ood = gate.summary(gate_sha)
    elif metadata.ood:
        logger.warning("Bundle %s %s saved without its ood gate", metadata.name, metadata.version)
    metadata = replace(
        metadata,
        ood=ood,
        weights_sha256=sha,
        created=metadata.created or datetime.now(UTC).isoformat(timespec="seconds"),
        device_uid=metadata.device_uid
        or generate_uid(entropy_srcs=[metadata.name, metadata.version, sha]),
    )
    text = json.dumps(metadata.to_json(), indent=2) + "\n"
    _atomic_write(directory / METADATA_PATH, lambda fh: fh.write(text.encode("utf-8")))
    logger.info("Saved bundle %s %s to %s", metadata.name, metadata.version, directory)
    return metadata


def load_bundle(directory: Path, *, device: str | torch.device = "cpu") -> LoadedBundle:
    """Load and validate a bundle; the model comes back in eval mode with frozen weights."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    if not metadata.device_uid:
        raise BundleError(f"Bundle {directory}: metadata.json: missing key device_uid")
    model = build_model(metadata)
    weights = directory / WEIGHTS_PATH
    if not weights.is_file():
        raise BundleError(f"Bundle {directory}: missing {WEIGHTS_PATH}")
    if metadata.weights_sha256 and _sha256(weights) != metadata.weights_sha256:
        raise BundleError(
            f"Bundle {directory}: {WEIGHTS_PATH} does not match weights_sha256 "
            f'"{metadata.weights_sha256}" (replaced or corrupted weights)'
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise BundleError(f"Bundle {directory}: cannot load {WEIGHTS_PATH}: {exc}") from exc
    _load_state(model, state, f"Bundle {directory}: {WEIGHTS_PATH}")
    gate = read_gate(directory, metadata.ood, metadata.weights_sha256)
    if gate is not None:
        find_layer(model, gate.layer)
    model.eval().requires_grad_(False).to(device)
    logger.info("Loaded bundle %s %s (%s)", metadata.name, metadata.version, metadata.device_uid)
    return LoadedBundle(metadata, model, metadata.identity(), directory, gate)
