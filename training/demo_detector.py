"""The node's demo nodule detector: phantoms written as real DICOM, then the same
``training fit --task detection`` pipeline an ML engineer runs (patient-level split,
the node's preprocessing, F1-calibrated threshold, validation AP50 in the bundle).

DEMO, not for clinical use: phantoms only, labelled so in the bundle and every output.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ai.bundle.load import load_bundle, save_bundle
from training.ood import gate_on_phantoms

logger = logging.getLogger(__name__)

DETECTOR_NAME = "cxr-demo-detector"
DETECTOR_VERSION = "1.0.0"
# A half-width ResNet-10 RetinaNet with a 32-channel FPN: learns phantom nodules on CPU in
# about a minute (tests/unit/training/test_fit_detection_learning.py: AP50 0.89-1.00).
NETWORK = {"backbone": "resnet10", "widen_factor": 0.5, "fpn_channels": 32, "head_convs": 2}
FULL = {"count": 240, "size": 256, "epochs": 8}
QUICK = {"count": 16, "size": 128, "epochs": 1}


def build_demo_detector(out_dir: Path, *, seed: int = 0, progress: bool = True,
                        quick: bool = False, threads: int = 0, label: str = "") -> Path:
    """Synthesize phantoms, fit the detector, write the bundle at ``out_dir`` (``label``
    prefixes the progress bars, e.g. ``"[2/2] "``)."""
    from training.fit.detection import DetectionFitConfig, fit_detection
    from training.synth import synthesize

    plan = QUICK if quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-demo-det-") as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        with tqdm(total=plan["count"], desc=f"{label}phantoms", unit="study",
                  disable=not progress) as bar:
            synthesize(data, plan["count"], seed + 4, size=plan["size"], prevalence=0.5,
                       progress=bar.update)
        config = DetectionFitConfig(
            data=data, labels=data / "boxes.json", out=run, label_names=("nodule",),
            network_args=dict(NETWORK), image_size=plan["size"], epochs=plan["epochs"],
            batch_size=8, split=(0.6, 0.2, 0.2), patience=0, seed=seed + 4,
            threads=threads, progress=progress, progress_label=label, name=DETECTOR_NAME,
            version=DETECTOR_VERSION if not quick else f"{DETECTOR_VERSION}-quick",
            description="Demo nodule detector trained on procedural phantoms. "
            "DEMO, not for clinical use.")
        result = fit_detection(config)
        if result.bundle_dir is None:
            raise RuntimeError("the detection run wrote no bundle")
        loaded = load_bundle(result.bundle_dir)
        meta = replace(loaded.metadata, demo=True, device_uid="", weights_sha256="",
                       training={**loaded.metadata.training, "demo_data":
                                 f"{plan['count']} phantom studies at {plan['size']} px",
                                 "total_seconds": round(time.perf_counter() - started, 1)})
        staging = Path(tmp) / "bundle"
        save_bundle(staging, meta, loaded.model, gate=loaded.gate)
        gate_on_phantoms(staging, quick=quick, size=plan["size"], seed=seed + 9)
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staging, out_dir)
    logger.info("Demo detector written to %s in %.0f s", out_dir, time.perf_counter() - started)
    return out_dir
