"""Test data for the web tests: a node database filled through the real code paths
(ingest, study assembly, the analysis worker with a fake model, outputs, deliveries), plus
evaluation runs inserted directly. Patient values are canaries that must never appear in
an API response, an error body or /metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from flask import Flask
from flask.testing import FlaskClient
from helpers.dicomfiles import CT, make_image, received
from helpers.fakes import FakeAnalyzer
from sqlalchemy import Engine, insert, select, update

from ai.types import AnalysisError
from dicom_node.config import Destination, Settings, load_settings
from dicom_node.evaluation.service import EvaluationService
from dicom_node.ingest import Ingestor
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.spool import Spool, Watermarks
from dicom_node.store import db
from dicom_node.studies import StudyAssembler
from dicom_node.worker import AnalysisWorker

TOKEN = "web-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEST = "DEST@127.0.0.1:11199"
CANARY = {"PatientName": "Zyx^Canaryweb", "PatientID": "CANARYWEBPID",
          "PatientBirthDate": "19020304", "AccessionNumber": "CANARYWEBACC"}
CANARY_STRINGS = [*CANARY.values(), "Canaryweb", "Zyx Canaryweb"]


@dataclass
class WebData:
    """UIDs and ids of what ``populate`` made."""

    done: str = ""  # analysed, SR + 2 SC + GSPS, deliveries: dead, sent, not_accepted,
    #                 retrying
    ignored: str = ""  # CT: ignored
    failed: str = ""  # the model raised: failed (its error quotes the patient name)
    receiving: str = ""  # just received, not assembled
    dead_delivery: int = 0
    sent_delivery: int = 0
    not_accepted_delivery: int = 0
    retrying_delivery: int = 0
    runs: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)


def web_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage.data_dir": str(data_dir), "storage.min_free_bytes": 0,
        "studies.quiet_period_s": 0, "web.token": TOKEN,
        "destinations": [{"ae_title": "DEST", "host": "127.0.0.1", "port": 11199}],
        "evaluation.jobs": [
            {"name": "nightly-reference", "kind": "reference",
             "reference": {"dicom_dir": str(data_dir / "ref"),
                           "labels_csv": str(data_dir / "ref" / "labels.csv")},
             "floors": {"nodule": {"sensitivity": 0.8, "specificity": 0.7}}},
            {"name": "live-confirmed", "kind": "confirmed"}],
    }
    values.update(overrides)
    return load_settings(None, overrides=values, environ={})


def canary_image(**kwargs: Any) -> pydicom.Dataset:
    ds = make_image(**kwargs)
    for keyword, value in CANARY.items():
        setattr(ds, keyword, value)
    return ds


def populate(settings: Settings, engine: Engine) -> WebData:
    data = WebData()
    spool = Spool(settings.storage.data_dir / "spool")
    ingestor = Ingestor(engine, spool, max_instance_bytes=50_000_000)
    assembler = StudyAssembler(engine, spool, settings.studies.selection, 0.0)
    queue = JobQueue(engine, lease_s=60, max_attempts=1)
    outputs = OutputSettings(sr=True, sc=True, gsps=True, institution_name=None,
                             heatmap_alpha=0.35)

    def study(n: int, **kwargs: Any) -> str:
        uid = pydicom.uid.generate_uid()
        for i in range(n):
            ingestor.ingest(received(canary_image(study_uid=uid, seed=i, **kwargs)))
        return uid

    data.done = study(2)
    data.ignored = study(1, sop_class=CT, modality="CT")
    assembler.run_once(time.time() + 1)
    dests = [Destination.parse(DEST)]
    AnalysisWorker(engine, spool, queue, FakeAnalyzer(), outputs, dests).process_one("t")
    data.failed = study(1)
    assembler.run_once(time.time() + 1)
    boom = AnalysisError(f"model exploded on {CANARY['PatientName']} / {CANARY['PatientID']}")
    AnalysisWorker(engine, spool, queue, FakeAnalyzer(fail_with=boom), outputs,
                   dests).process_one("t")
    data.receiving = study(1)
    with engine.begin() as conn:
        ids = list(conn.execute(select(db.deliveries.c.id).order_by(db.deliveries.c.id))
                   .scalars())
        (data.dead_delivery, data.sent_delivery, data.not_accepted_delivery,
         data.retrying_delivery) = ids
        conn.execute(update(db.deliveries).where(db.deliveries.c.id == ids[0]).values(
            state="dead", attempts=8, last_error="association failed: connection refused"))
        conn.execute(update(db.deliveries).where(db.deliveries.c.id == ids[1]).values(
            state="sent", attempts=1, sent_at=time.time(), last_status=0,
            transfer_syntax="1.2.840.10008.1.2.5"))
        conn.execute(update(db.deliveries).where(db.deliveries.c.id == ids[2]).values(
            state="not_accepted", attempts=1,
            last_error=f"not accepted by {DEST}: Comprehensive SR Storage"))
        conn.execute(update(db.deliveries).where(db.deliveries.c.id == ids[3]).values(
            state="retrying", attempts=1, last_status=0xA700,
            last_error="status 0xA700 (out of resources)"))
    populate_evaluation(engine, data)
    return data


def _figure(value: float, half: float) -> dict[str, float]:
    return {"": value, "_lo": max(0.0, value - half), "_hi": min(1.0, value + half)}


Figures = dict[str, tuple[float, float]]  # label -> (sensitivity, specificity)


def insert_run(engine: Engine, job: str, started: float, figures: Figures, *,
               state: str = "succeeded", error: str | None = None,
               model: tuple[str, str] = ("fake-model", "1.0"),
               more_models: dict[tuple[str, str], Figures] | None = None) -> int:
    """One run with a metrics row per label of ``model`` (name, version), and of each of
    ``more_models`` (a run of several bundles: labels may repeat across models)."""
    per_model = {model: figures, **(more_models or {})}
    with engine.begin() as conn:
        run_id = conn.execute(insert(db.evaluation_runs).values(
            job_name=job, kind="reference", trigger="schedule", state=state,
            scheduled_for=started, started_at=started, finished_at=started + 30, error=error,
            n_images=40, alerts=0, models=json.dumps([
                {"name": name, "version": version, "thresholds": {label: 0.5 for label in f}}
                for (name, version), f in per_model.items()]),
        )).inserted_primary_key[0]
        rows = [_metrics_row(run_id, name, version, label, sens, spec)
                for (name, version), model_figures in per_model.items()
                for label, (sens, spec) in model_figures.items()]
        if rows:
            conn.execute(insert(db.evaluation_metrics), rows)
    return int(run_id)


def _metrics_row(run_id: int, name: str, version: str, label: str, sens: float,
                 spec: float) -> dict[str, Any]:
    values: dict[str, Any] = {"run_id": run_id, "model_name": name, "model_version": version,
                              "label": label, "threshold": 0.5, "n_pos": 20, "n_neg": 20,
                              "tp": round(20 * sens), "fn": 20 - round(20 * sens),
                              "tn": round(20 * spec), "fp": 20 - round(20 * spec), "f1": 0.8,
                              "ap50": None, "froc": None, "localisation": None}
    for figure, value in (("sensitivity", sens), ("specificity", spec), ("ppv", 0.8),
                          ("npv", 0.8), ("auroc", 0.88)):
        for suffix, v in _figure(value, 0.12).items():
            values[f"{figure}{suffix}"] = v
    roc = [[0.0, 0.0], [0.1, 0.5], [1 - spec, sens], [0.6, 0.95], [1.0, 1.0]]
    values["roc"] = json.dumps(sorted(roc))
    if label == "nodule":  # Grad-CAM localisation (a reference with locations.json)
        values["localisation"] = json.dumps({
            "tp_images": 18, "hits": 16, "lung_energy": 0.71, "tolerance_model_px": 15.0,
            "hit_rate": {"value": 16 / 18, "lower": 0.67, "upper": 0.97}})
    return values


def populate_evaluation(engine: Engine, data: WebData | None = None) -> WebData:
    data = data or WebData()
    now = time.time()
    job = "nightly-reference"
    data.runs["old"] = insert_run(engine, job, now - 3 * 86400,
                                  {"nodule": (0.9, 0.85), "effusion": (0.8, 0.9)})
    data.runs["mid"] = insert_run(engine, job, now - 2 * 86400,
                                  {"nodule": (0.85, 0.8), "effusion": (0.82, 0.88)})
    data.runs["failed"] = insert_run(engine, job, now - 86400, {}, state="failed",
                                     error="EvaluationError: reference dicom_dir missing")
    data.runs["latest"] = insert_run(engine, job, now - 3600,
                                     {"nodule": (0.7, 0.82), "effusion": (0.85, 0.9)})
    with engine.begin() as conn:
        for key, acknowledged in (("active", None), ("acknowledged", now - 60)):
            data.alerts[key] = int(conn.execute(insert(db.evaluation_alerts).values(
                run_id=data.runs["latest"], job_name=job, model_name="fake-model",
                label="nodule", metric="sensitivity", value=0.7, floor=0.8,
                created_at=now - 3500, acknowledged_at=acknowledged)).inserted_primary_key[0])
        conn.execute(update(db.evaluation_runs).where(
            db.evaluation_runs.c.id == data.runs["latest"]).values(alerts=2))
    return data


@dataclass
class WebEnv:
    settings: Settings
    engine: Engine
    app: Flask
    client: FlaskClient
    data: WebData

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.client.get(url, headers=AUTH, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.client.post(url, headers=AUTH, **kwargs)


class StubNode:
    """What the web app reads from a running node: a listener that is up, a loaded (fake)
    model, the assembler and the evaluation service."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        storage = settings.storage
        self.spool = Spool(storage.data_dir / "spool", watermarks=Watermarks(
            storage.high_watermark_pct, storage.low_watermark_pct))
        self.assembler = StudyAssembler(engine, self.spool, settings.studies.selection, 0.0)
        self.server: object | None = object()
        self.analyzer: FakeAnalyzer | None = FakeAnalyzer()
        self.model_error: str | None = None
        self.stop_event = threading.Event()
        self.evaluation = EvaluationService(engine, settings, deployed=lambda: self.analyzer,
                                            stop_event=self.stop_event)


def csrf(page: str) -> str:
    """The CSRF token of the first form in a dashboard page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "form without CSRF token"
    return match.group(1)


def login(env: WebEnv, token: str = TOKEN) -> Any:
    form = env.client.get("/dashboard/login")
    return env.client.post("/dashboard/login", data={"token": token,
                                                     "csrf_token": csrf(form.text)})


