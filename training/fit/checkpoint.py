"""What a run folder keeps: checkpoints, imported pretrained weights, JSON records.

Checkpoints hold everything a run needs to continue exactly where it stopped.

``last.pt`` holds the model, optimiser, LR scheduler and AMP scaler states, the epoch and
step counters, the best validation metric (and its epoch), the early-stopping counter, the
history of epoch records and the random states (Python, NumPy, torch CPU and CUDA).
``best.pt`` holds the weights of the best epoch so far.

Files contain tensors and plain Python values only, so they load with
``torch.load(weights_only=True)``: a checkpoint copied from elsewhere cannot run code.
Writes are atomic (temporary file + rename): a crash during a save leaves the previous
checkpoint intact.

:func:`load_pretrained` imports user-supplied weights (``--pretrained``) leniently and says
what did not fit; :func:`write_json` writes the run's JSON records the same atomic way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pydicom
import torch
from torch import nn

from training.densenet_keys import monai_key
from training.errors import TrainingError

logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


class CheckpointError(TrainingError, ValueError):
    """A checkpoint is missing, unreadable or from another kind of run."""


def rng_state() -> dict[str, Any]:
    """The global random states, as tensors and plain values (``weights_only``-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only where CUDA is present)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (with the format version) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format_version": FORMAT_VERSION, **payload}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint "{path}" does not exist')
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f'checkpoint "{path}" cannot be read: {exc}') from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f'"{path}" is not a training checkpoint of this version')
    return payload


# --------------------------------------------------------------------------------------------
# User-supplied pretrained weights


def _adapt(name: str, value: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
    """Fit a pretrained tensor to the model's shape where that is meaningful, else None.

    A first convolution trained on RGB (out, 3, k, k) becomes grey (out, 1, k, k) by summing
    its input channels: a grey image replicated three times gives the same response. Any
    other difference (another architecture, another label count) is not adapted.
    """
    if value.shape == wanted.shape:
        return value
    if (
        value.ndim == wanted.ndim >= 3
        and value.shape[0] == wanted.shape[0]
        and value.shape[2:] == wanted.shape[2:]
    ):
        if wanted.shape[1] == 1 and value.shape[1] == 3:  # RGB stem -> grey stem
            logger.info("Pretrained %s: summed its 3 input channels to 1", name)
            return value.sum(dim=1, keepdim=True)
        if value.shape[1] == 1 and wanted.shape[1] == 3:
            return value.repeat(1, wanted.shape[1], *([1] * (value.ndim - 2))) / wanted.shape[1]
    return None


def load_pretrained(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a user-supplied state_dict (strict=False) and report what did not fit.

    Accepts a bare state_dict or one under ``state_dict`` / ``model`` (checkpoints), strips
    ``module.`` prefixes (DDP), adapts the first convolution's input channels and skips
    tensors whose shapes differ (e.g. a classifier head for another label set).
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'--pretrained "{path}" does not exist') from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f'--pretrained "{path}" is not a loadable state_dict: {exc}') from exc
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f'--pretrained "{path}" holds no state_dict of tensors')
    own = model.state_dict()
    state, mismatched = {}, []
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key not in own and monai_key(key) in own:  # torchvision DenseNet names
            key = str(monai_key(key))
        if key not in own:
            state[key] = value  # reported as unexpected by load_state_dict
            continue
        adapted = _adapt(key, value, own[key])
        if adapted is None:
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            state[key] = adapted.to(own[key].dtype)
    result = model.load_state_dict(state, strict=False)
    report = {
        "file": str(path),
        "loaded": len(state) - len(result.unexpected_keys),
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
        "shape_mismatch": mismatched,
    }
    logger.info("Pretrained weights: %d tensors loaded, %d missing, %d unexpected, %d skipped",
                report["loaded"], len(report["missing"]), len(report["unexpected"]),
                len(mismatched))  # fmt: skip
    if report["loaded"] == 0:
        raise CheckpointError(
            f'--pretrained "{path}": no tensor fits network "{model.__class__.__name__}"'
        )
    return report


# --------------------------------------------------------------------------------------------
# JSON records of a run


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
    }


def git_commit() -> str | None:
    """The commit of this checkout, when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically write a JSON record (NaN/inf become null)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(clean_json(doc), indent=2, default=_json_default) + "\n", encoding="utf-8"
    )
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def clean_json(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
