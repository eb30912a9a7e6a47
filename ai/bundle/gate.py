"""A bundle's out-of-distribution gate: what the model's training inputs looked like.

A network answers with full confidence about images unlike anything it was trained on (a
phantom-trained model calls a real radiograph "pleural effusion, 100 %"). The gate records
the mean and a shrunk covariance of the network's pooled penultimate features on its own
training inputs; an image's score is the Mahalanobis distance of its features from that
mean, and the threshold is the ``quantile`` of the *validation* split's scores, so that
this fraction of in-distribution images passes. Above the threshold the node withholds the
model's findings for the image and says why.

Stored as ``models/ood_gate.npz`` (mean, precision) plus the ``ood`` section of
``configs/metadata.json`` (version, threshold, file hash, the weights it was fitted for).
Read without torch; every malformed part is a :class:`~ai.types.BundleError` that names it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ai.types import BundleError

GATE_PATH = Path("models") / "ood_gate.npz"
GATE_VERSION = 1
SCORE_NAME = "mahalanobis"
DEFAULT_QUANTILE = 0.975
"""Fraction of the validation split that passes (the issue asks for 95-99 %)."""
QUANTILE_RANGE = (0.5, 1.0)


@dataclass(frozen=True)
class OodGate:
    """Mahalanobis distance of pooled features from the training mean, and its threshold.

    ``layer``: the module whose output is pooled (global average over the spatial axes; a
    module returning several maps, such as the detector's backbone body, gives its last,
    deepest one). ``weights_sha256``: the weights the statistics belong to; a gate fitted
    for other weights is refused at load.
    """

    mean: np.ndarray  # (D,) float64
    precision: np.ndarray  # (D, D) float64, inverse of the shrunk covariance
    threshold: float
    quantile: float
    layer: str
    n_fit: int
    n_val: int
    shrinkage: float
    weights_sha256: str = ""
    fitted_on: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(B,) Mahalanobis distances of ``features`` (B, D) from the training mean."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape} do not fit a gate of dim {self.dim}")
        d = x - self.mean
        return np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", d, self.precision, d), 0.0))

    def summary(self, file_sha256: str) -> dict[str, Any]:
        """The ``ood`` section of metadata.json (the arrays live in :data:`GATE_PATH`)."""
        return {
            "version": GATE_VERSION,
            "score": SCORE_NAME,
            "file": GATE_PATH.as_posix(),
            "sha256": file_sha256,
            "layer": self.layer,
            "dim": self.dim,
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "n_fit": int(self.n_fit),
            "n_val": int(self.n_val),
            "shrinkage": float(self.shrinkage),
            "weights_sha256": self.weights_sha256,
            "fitted_on": self.fitted_on,
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype(np.float64),
                 precision=self.precision.astype(np.float64))  # fmt: skip
        return buf.getvalue()


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise BundleError(f"metadata.json: missing key ood.{key}")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BundleError(f'metadata.json: ood.{key} = "{value}" has the wrong type')
    return value


def check_summary(doc: Any) -> dict[str, Any]:
    """Validate the ``ood`` section of metadata.json (empty: the bundle has no gate)."""
    if not isinstance(doc, dict):
        raise BundleError(f'metadata.json: ood = "{doc}" must be an object')
    if not doc:
        return {}
    version = _field(doc, "version", int)
    if version != GATE_VERSION:
        raise BundleError(f'metadata.json: ood.version = "{version}" is not supported '
                          f"(this node reads version {GATE_VERSION})")  # fmt: skip
    if _field(doc, "score", str) != SCORE_NAME:
        raise BundleError(f'metadata.json: ood.score = "{doc["score"]}" must be "{SCORE_NAME}"')
    if _field(doc, "file", str) != GATE_PATH.as_posix():
        raise BundleError(f'metadata.json: ood.file = "{doc["file"]}" must be "{GATE_PATH}"')
    for key in ("sha256", "layer"):
        if not _field(doc, key, str):
            raise BundleError(f"metadata.json: ood.{key} must not be empty")
    if _field(doc, "dim", int) < 1:
        raise BundleError(f'metadata.json: ood.dim = "{doc["dim"]}" must be >= 1')
    threshold = _field(doc, "threshold", (int, float))
    if not np.isfinite(threshold) or threshold <= 0:
        raise BundleError(f'metadata.json: ood.threshold = "{threshold}" must be positive')
    quantile = _field(doc, "quantile", (int, float))
    if not QUANTILE_RANGE[0] <= quantile <= QUANTILE_RANGE[1]:
        raise BundleError(f'metadata.json: ood.quantile = "{quantile}" must lie in '
                          f"[{QUANTILE_RANGE[0]}, {QUANTILE_RANGE[1]}]")  # fmt: skip
    for key in ("n_fit", "n_val"):
        if _field(doc, key, int) < 1:
            raise BundleError(f'metadata.json: ood.{key} = "{doc[key]}" must be >= 1')
    _field(doc, "shrinkage", (int, float))
    _field(doc, "weights_sha256", str)
    return dict(doc)


def gate_file_bytes(gate: OodGate) -> tuple[bytes, str]:
    """(npz bytes, their SHA-256) as :func:`ai.bundle.load.save_bundle` writes them."""
    data = gate.to_bytes()
    return data, hashlib.sha256(data).hexdigest()


def read_gate(directory: Path, summary: Mapping[str, Any], weights_sha256: str) -> OodGate | None:
    """The gate of the bundle at ``directory`` (None when its metadata has no ``ood``)."""
    if not summary:
        return None
    path = Path(directory) / GATE_PATH
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"Bundle {directory}: metadata.json has an ood gate but "
                          f"{GATE_PATH} is missing") from exc  # fmt: skip
    if hashlib.sha256(data).hexdigest() != summary["sha256"]:
        raise BundleError(f"Bundle {directory}: {GATE_PATH} does not match ood.sha256 "
                          "(replaced or corrupted gate)")  # fmt: skip
    if summary["weights_sha256"] and summary["weights_sha256"] != weights_sha256:
        raise BundleError(f"Bundle {directory}: the ood gate was fitted for other weights "
                          "(refit it: training ood-gate)")  # fmt: skip
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            mean, precision = np.asarray(npz["mean"]), np.asarray(npz["precision"])
    except (KeyError, ValueError, OSError) as exc:
        raise BundleError(f"Bundle {directory}: unreadable {GATE_PATH}: {exc}") from exc
    dim = int(summary["dim"])
    if mean.shape != (dim,) or precision.shape != (dim, dim):
        raise BundleError(f"Bundle {directory}: {GATE_PATH} holds mean {mean.shape} and "
                          f"precision {precision.shape}, metadata says dim {dim}")  # fmt: skip
    if not (np.isfinite(mean).all() and np.isfinite(precision).all()):
        raise BundleError(f"Bundle {directory}: {GATE_PATH} holds non-finite values")
    return OodGate(
        mean=mean.astype(np.float64), precision=precision.astype(np.float64),
        threshold=float(summary["threshold"]), quantile=float(summary["quantile"]),
        layer=str(summary["layer"]), n_fit=int(summary["n_fit"]), n_val=int(summary["n_val"]),
        shrinkage=float(summary["shrinkage"]), weights_sha256=str(summary["weights_sha256"]),
        fitted_on=str(summary.get("fitted_on", "")),
    )  # fmt: skip
