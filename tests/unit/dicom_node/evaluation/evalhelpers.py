"""Helpers for the evaluation tests: an analyzer with fixed probabilities per SOP UID, a
hand-made reference set whose figures are computed by hand, settings and findings rows."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from helpers.dicomfiles import CT, make_image, write
from sqlalchemy import Engine, insert

from ai.types import CodedConcept, Finding, ImageResult, ModelIdentity, PixelDataError
from dicom_node.config import Settings, load_settings
from dicom_node.store import db

MODEL = ModelIdentity(name="fixed-model", version="2.0", device_uid="2.25.777",
                      task="classification")
CODES = {"nodule": CodedConcept("27925004", "SCT", "Nodule"),
         "cardiomegaly": CodedConcept("287272002", "SCT", "Cardiomegaly"),
         "pneumothorax": CodedConcept("36118008", "SCT", "Pneumothorax")}
THRESHOLDS = {"nodule": 0.5, "cardiomegaly": 0.3, "pneumothorax": 0.5}

# The hand-computed reference set (label nodule, threshold 0.5):
#   truth 1 1 1 1 0 0 0 0 0    0
#   prob  .9 .8 .6 .3 .7 .2 .1 .4 .05 .55
#   call  1 1 1 0 1 0 0 0 0    1    -> TP 3, FN 1, FP 2, TN 4
# sensitivity 3/4, specificity 4/6, PPV 3/5, NPV 4/5, F1 6/9,
# AUROC = pairs (pos > neg) / 24 = (6 + 6 + 5 + 3) / 24 = 20/24.
NODULE_TRUTH = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
NODULE_PROBS = [0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05, 0.55]
# cardiomegaly: no positive case at all -> sensitivity undefined, specificity 8/10
CARDIO_PROBS = [0.1, 0.2, 0.35, 0.0, 0.5, 0.1, 0.2, 0.25, 0.1, 0.15]


class FixedAnalyzer:
    """Returns fixed probabilities per SOP Instance UID (default 0.0 for unknown UIDs)."""

    def __init__(self, probs: dict[str, dict[str, float]] | None = None, *,
                 delay_s: float = 0.0, fail_with: Exception | None = None,
                 bad_pixels: Sequence[str] = ()) -> None:
        self.probs = probs or {}
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.bad_pixels = set(bad_pixels)
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    @property
    def models(self) -> list[ModelIdentity]:
        return [MODEL]

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        with self._lock:
            self.calls.append(uids)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        if self.bad_pixels & set(uids):
            raise PixelDataError("undecodable")
        out = []
        for ds, uid in zip(datasets, uids, strict=True):
            probs = self.probs.get(uid, {})
            findings = [Finding(label, CODES[label], probs.get(label, 0.0), t,
                                probs.get(label, 0.0) >= t, MODEL)
                        for label, t in THRESHOLDS.items()]
            out.append(ImageResult(uid, int(ds.Rows), int(ds.Columns), findings, None, [MODEL]))
        return out


@dataclass
class ReferenceSet:
    dicom_dir: Path
    labels_csv: Path
    probs: dict[str, dict[str, float]]
    sop_uids: list[str]  # the ten labelled, analysable images in order
    study_uids: list[str]


def make_reference_set(root: Path) -> ReferenceSet:
    """Ten labelled images (the table above), plus what must be excluded and counted:
    a lateral view and a CT (selection rules), an image without a label row, a label row
    without an image, and a non-DICOM file."""
    dicom_dir = root / "refset"
    probs: dict[str, dict[str, float]] = {}
    rows = []
    sops, studies = [], []
    for i, (truth, p, pc) in enumerate(zip(NODULE_TRUTH, NODULE_PROBS, CARDIO_PROBS,
                                           strict=True)):
        ds = make_image(seed=i, rows=260, cols=256)
        write(ds, dicom_dir / f"case{i:02d}")
        probs[ds.SOPInstanceUID] = {"nodule": p, "cardiomegaly": pc, "pneumothorax": 0.9}
        rows.append({"sop_instance_uid": ds.SOPInstanceUID,
                     "path": f"case{i:02d}/{ds.SOPInstanceUID}.dcm",
                     "study_instance_uid": ds.StudyInstanceUID, "patient_id": f"P{i}",
                     "view": "PA", "nodule": truth, "cardiomegaly": 0})
        sops.append(ds.SOPInstanceUID)
        studies.append(ds.StudyInstanceUID)
    lateral = make_image(view="LL", seed=20)
    ct = make_image(sop_class=CT, modality="CT", seed=21)
    for ds in (lateral, ct):
        write(ds, dicom_dir / "excluded")
        rows.append({"sop_instance_uid": ds.SOPInstanceUID, "path": "", "study_instance_uid":
                     ds.StudyInstanceUID, "patient_id": "PX", "view": "", "nodule": 1,
                     "cardiomegaly": 1})
    write(make_image(seed=22), dicom_dir / "unlabelled")
    rows.append({"sop_instance_uid": "1.2.3.4.5.6.7", "path": "missing.dcm",
                 "study_instance_uid": "1.2.3.4.5.6", "patient_id": "PY", "view": "PA",
                 "nodule": 1, "cardiomegaly": 0})
    labels_csv = dicom_dir / "labels.csv"  # inside dicom_dir: a non-DICOM file to skip
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return ReferenceSet(dicom_dir, labels_csv, probs, sops, studies)


def eval_settings(data_dir: Path, jobs: list[dict[str, Any]] | None = None,
                  **evaluation: Any) -> Settings:
    """Node settings on ``data_dir`` with the given evaluation jobs (dicts as in YAML)."""
    overrides: dict[str, Any] = {
        "storage.data_dir": str(data_dir), "web.enabled": False,
        "evaluation.jobs": jobs or [], "evaluation.model_wait_s": 5,
        **{f"evaluation.{k}": v for k, v in evaluation.items()}}
    return load_settings(None, overrides=overrides, environ={})


def reference_job(ref: ReferenceSet, name: str = "ref", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "reference",
            "reference": {"dicom_dir": str(ref.dicom_dir), "labels_csv": str(ref.labels_csv)},
            **extra}


def add_analysed(engine: Engine, study_uid: str, images: dict[str, dict[str, float]], *,
                 finished_at: float | None = None, thresholds: dict[str, float] | None = None,
                 model: ModelIdentity = MODEL) -> int:
    """A done job for ``study_uid`` with findings {sop: {label: probability}}."""
    thresholds = thresholds or THRESHOLDS
    now = time.time() if finished_at is None else finished_at
    with engine.begin() as conn:
        job_id = conn.execute(insert(db.jobs).values(
            study_uid=study_uid, state="done", attempts=1, created_at=now, started_at=now,
            finished_at=now)).inserted_primary_key[0]
        for sop, probs in images.items():
            for label, p in probs.items():
                code = CODES[label]
                conn.execute(insert(db.findings).values(
                    job_id=job_id, sop_instance_uid=sop, label=label, code_value=code.value,
                    code_scheme=code.scheme, code_meaning=code.meaning, probability=p,
                    threshold=thresholds[label], positive=p >= thresholds[label],
                    model_name=model.name, model_version=model.version,
                    device_uid=model.device_uid))
    return int(job_id)



def temp_engine(tmp_path: Path, db_url: str | None = None) -> Iterator[Engine]:
    """The body of each module's ``engine`` fixture (no conftest.py here: it would replace
    the root ``conftest`` module that other test files import helpers from)."""
    eng = db.make_engine(db_url or f"sqlite:///{tmp_path / 'data' / 'node.db'}")
    yield eng
    eng.dispose()
