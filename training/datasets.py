"""Torch datasets over matched DICOM, through the node's own preprocessing.

Every image goes through :func:`ai.pixels.preprocess` with the bundle's
:class:`~ai.pixels.PreprocessParams` (size, optional CLAHE, percentile window): the
tensors a model is trained on are exactly those the node will feed it.

Decoding a compressed radiograph costs far more than a training step on a small network,
so decoded and preprocessed arrays are cached: in memory (per process, up to a byte budget)
and optionally on disk as ``.npy`` files named by SOP Instance UID and a hash of the
preprocessing parameters (plus :data:`CACHE_VERSION`), so epochs after the first, other
DataLoader workers, resumed runs and later runs with the same parameters read arrays
instead of DICOM. Disk writes are atomic (temporary file + rename), so concurrent ranks can
share one cache folder.

Augmentation (training only) uses MONAI array transforms, chosen for chest radiographs:

* small affine jitter: rotation up to +-10 degrees, scale 0.9-1.1, shift up to 4 %
  (positioning varies between exposures; zero padding keeps the letterbox black);
* contrast (gamma 0.7-1.4) and a little Gaussian noise (exposure, detector and
  post-processing vary between sites);
* **no flips**: a left-right flip moves the heart to the right (dextrocardia is a finding,
  not an augmentation) and swaps the side of every lateralised finding; an up-down flip
  never happens in practice.

Each item's random draw is seeded from ``(seed, epoch, index)``: the sampler hands the
dataset ``(index, epoch)`` keys, so the augmentation of a given epoch is the same with any
number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandGaussianNoise
from torch.utils.data import Dataset

from ai.pixels import PreprocessParams, preprocess
from ai.types import PixelDataError
from training.images import is_image_file, load_image_file

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the preprocessing code changes in a way the parameters do not capture."""
_UID_FILE_RE = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class ImageItem:
    """One image to load: where it is, its SOP Instance UID and its target vector."""

    path: Path
    sop_instance_uid: str
    targets: tuple[float, ...]


def params_hash(params: PreprocessParams) -> str:
    """A short, stable hash of everything that changes the preprocessed array."""
    doc = asdict(params)
    doc.pop("max_pixels", None)  # a refusal limit, not part of the result
    if not params.scaled:  # plain [0, 1] input: the same hash as before these fields existed
        for key in ("channels", "mean", "std"):
            doc.pop(key, None)
    doc["cache_version"] = CACHE_VERSION
    text = json.dumps(doc, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_preprocessed(path: Path, params: PreprocessParams) -> np.ndarray:
    """Read one DICOM (or PNG / JPEG) file and run the node's preprocessing: float32
    (channels, size, size)."""
    if is_image_file(path):
        return load_image_file(path, params)
    ds = pydicom.dcmread(path)
    array, _ = preprocess(ds, params)
    return np.ascontiguousarray(array, dtype=np.float32)


class ImageCache:
    """Preprocessed arrays by SOP Instance UID: memory first, then an optional disk folder.

    Args:
        params: preprocessing parameters (their hash names the disk files).
        directory: disk cache folder (created), or None for memory only.
        memory_bytes: memory budget; arrays beyond it are not kept in memory (0 = none).
        loader: ``(path, params) -> array``; :func:`load_preprocessed` by default.
    """

    def __init__(
        self,
        params: PreprocessParams,
        directory: Path | None = None,
        *,
        memory_bytes: int = 4 << 30,
        loader: Callable[[Path, PreprocessParams], np.ndarray] | None = None,
    ) -> None:
        self.params = params
        self.key = params_hash(params)
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = int(memory_bytes)
        self.loader = loader or load_preprocessed
        self._memory: dict[str, np.ndarray] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.hits = {"memory": 0, "disk": 0, "decoded": 0}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no lock, no copy of RAM
        state = self.__dict__.copy()
        state.pop("_lock")
        state["_memory"], state["_used"] = {}, 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _file(self, sop_uid: str) -> Path | None:
        if self.directory is None:
            return None
        name = (
            sop_uid if _UID_FILE_RE.match(sop_uid) else hashlib.sha256(sop_uid.encode()).hexdigest()
        )
        return self.directory / f"{name}_{self.key}.npy"

    def get(self, item: ImageItem) -> np.ndarray:
        """The preprocessed array of ``item`` (decoded at most once per cache)."""
        array = self._memory.get(item.sop_instance_uid)
        if array is not None:
            self.hits["memory"] += 1
            return array
        file = self._file(item.sop_instance_uid)
        array = self._read_disk(file) if file is not None else None
        if array is not None:
            self.hits["disk"] += 1
        else:
            try:
                array = self.loader(item.path, self.params)
            except PixelDataError as exc:
                raise PixelDataError(f"SOP Instance {item.sop_instance_uid}: {exc}") from exc
            self.hits["decoded"] += 1
            if file is not None:
                self._write_disk(file, array)
        self._remember(item.sop_instance_uid, array)
        return array

    def _remember(self, uid: str, array: np.ndarray) -> None:
        with self._lock:
            if self._used + array.nbytes <= self.memory_bytes and uid not in self._memory:
                self._memory[uid] = array
                self._used += array.nbytes

    def _read_disk(self, file: Path) -> np.ndarray | None:
        size = self.params.size
        try:
            array = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("Ignoring unreadable cache file %s (%s)", file.name, exc)
            return None
        if array.shape != (self.params.channels, size, size) or array.dtype != np.float32:
            logger.warning("Ignoring cache file %s of shape %s", file.name, array.shape)
            return None
        return array

    def _write_disk(self, file: Path, array: np.ndarray) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
            os.replace(tmp, file)
        except OSError as exc:  # a full or read-only cache disk slows training, nothing more
            logger.warning("Cannot write cache file %s: %s", file.name, exc)


def chest_augmentation(size: int, prob: float = 0.8) -> Compose:
    """The training augmentation for ``size`` px inputs (choices: see the module docstring)."""
    shift = 0.04 * size  # MONAI translates in pixels
    return Compose(
        [
            RandAffine(
                prob=prob,
                rotate_range=(float(np.deg2rad(10.0)),),
                scale_range=(0.1, 0.1),
                translate_range=(shift, shift),
                padding_mode="zeros",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
            RandGaussianNoise(prob=0.3, mean=0.0, std=0.01),
        ]
    )


class ClassificationDataset(Dataset):
    """Images and target vectors; items are dicts ``image``, ``target``, ``index``.

    ``dataset[i]`` or ``dataset[(i, epoch)]``: the epoch (from
    :class:`training.sampling.EpochSampler`) seeds that item's augmentation.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        cache: ImageCache,
        *,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.items = list(items)
        self.cache = cache
        self.seed = int(seed)
        self.transform = chest_augmentation(cache.params.size) if augment else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> np.ndarray:
        """(images, labels) float32 target matrix."""
        return np.asarray([item.targets for item in self.items], dtype=np.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int | np.integer) else key
        item = self.items[int(index)]
        array = self.cache.get(item)
        image = torch.from_numpy(array.copy())
        if self.transform is not None:
            seed = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)
            self.transform.set_random_state(seed=int(seed[0]))
            out = self.transform(image)
            image = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            image = image.float().clamp_(0.0, 1.0)
        return {
            "image": image,
            "target": torch.tensor(item.targets, dtype=torch.float32),
            "index": int(index),
        }
