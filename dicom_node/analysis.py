"""The node's one analyzer builder and the lock that serialises calls into the model.

Three places built an analyzer from bundle folders (``service.load_analyzer``, the
evaluation service's bundle loader, and through it ``dicom-node evaluate``), each with its
own copy of the device/Grad-CAM/size settings; they now all call :func:`build_analyzer`, so
an evaluation job scores images exactly as the serving node would. ``LockedAnalyzer`` lived in
``service.py``, which the evaluation service reached back into (``service -> scheduler ->
evaluation.service -> service``); here it depends on nothing of the node's wiring, which
breaks that circle.

The ``Analyzer`` protocol stays in :mod:`dicom_node.worker` in this branch (another helper of
issue 9 moves it to ``ai.types``).
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pydicom

from ai.types import Analyzer, ImageResult, ModelIdentity
from dicom_node.config import Settings
from dicom_node.errors import NodeError

logger = logging.getLogger(__name__)


class LockedAnalyzer:
    """Serialises calls into the model (one forward/Grad-CAM at a time per process)."""

    def __init__(self, inner: Analyzer) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    @property
    def models(self) -> list[ModelIdentity]:
        return self.inner.models

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        with self._lock:
            return self.inner.analyze(datasets)


def build_analyzer(settings: Settings, bundle_dirs: Sequence[Path]) -> Analyzer:
    """The model side for ``bundle_dirs`` with the node's device, Grad-CAM and size settings
    (the resolution images are analysed and overlaid at: ``outputs.sc_min_side``).

    Per-finding Grad-CAM maps (``ImageResult.finding_heatmaps``, megabytes each) are made
    only when the SEG output, their one reader, is on.
    """
    from ai.inference import Analyzer as ModelAnalyzer  # heavy import (torch): only when used

    m = settings.models
    return LockedAnalyzer(ModelAnalyzer(list(bundle_dirs), device=m.device, gradcam=m.gradcam,
                                        max_pixels=m.max_pixels,
                                        display_min_side=settings.outputs.sc_min_side,
                                        finding_maps=settings.outputs.seg))


def ensure_demo_bundle(settings: Settings) -> list[Path]:
    """Build the phantom-trained demo bundles on first run, with visible progress."""
    found = settings.bundle_dirs
    if found:
        return found
    target = settings.demo_bundle_dir
    if not settings.models.build_demo_if_missing:
        raise NodeError(f"no demo bundle under {target} and models.build_demo_if_missing "
                        "is false; configure models.bundles")
    target.parent.mkdir(parents=True, exist_ok=True)
    # several worker processes on one data dir start together: one builds, the others wait
    # for it and find its bundles (the kernel drops the lock if the builder dies)
    with open(target.parent / f".{target.name}.build-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return settings.bundle_dirs or _build_demo_bundles(settings, target)


def _build_demo_bundles(settings: Settings, target: Path) -> list[Path]:
    logger.warning("no model configured: building the DEMO bundles (trained on synthetic "
                   "images, not for clinical use) into %s; this takes a few minutes once",
                   target)
    cmd = [sys.executable, "-m", "training", "demo-bundles", "--out", str(target)]
    if settings.models.demo_build == "quick":
        cmd.append("--quick")
    if subprocess.run(cmd, check=False).returncode != 0:
        raise NodeError(f"building the demo bundles failed (command: {' '.join(cmd)})")
    found = settings.bundle_dirs
    if not found:
        raise NodeError(f"`training demo-bundles` wrote no bundle under {target}")
    return found


def load_analyzer(settings: Settings) -> Analyzer:
    """The deployed analyzer: the configured bundles (or the demo bundles, built once)."""
    return build_analyzer(settings, ensure_demo_bundle(settings))
