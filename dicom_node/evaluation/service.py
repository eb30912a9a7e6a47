"""``EvaluationService``: the one object the node, the CLI, the scheduler and the web API use.

Runs are recorded before they start (the database guard refuses a second concurrent run of
the same job), executed synchronously (CLI, scheduler) or in a background thread (API), and
end ``succeeded`` with figures and alerts, or ``failed`` with the reason. Nothing here
raises out of a run: the edge is the run record.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ai.reference.labels import LabelError, read_classes
from ai.types import Analyzer, ImageResult, ModelIdentity
from dicom_node.analysis import build_analyzer
from dicom_node.config import Settings
from dicom_node.evaluation.alerts import Alert, check_floors, post_webhook
from dicom_node.evaluation.confirmed import (
    DropOutcome,
    confirmed_cases,
    process_drop_folder,
    store_confirmed,
    validate_labels,
)
from dicom_node.evaluation.errors import (
    EvaluationBusyError,
    EvaluationError,
    EvaluationInterrupted,
    UnknownJobError,
)
from dicom_node.evaluation.figures import (
    LabelFigures,
    compute_figures,
    detection_figures,
    reference_boxes,
)
from dicom_node.evaluation.reference import evaluate_reference
from dicom_node.evaluation.settings import EvaluationJobSettings
from dicom_node.evaluation.store import AlertInfo, RunDetail, RunInfo, RunStore

logger = logging.getLogger(__name__)

TRIGGERS = ("schedule", "manual", "api", "catchup")


@dataclass(frozen=True)
class JobInfo:
    """A configured job and where it stands (``list_jobs``)."""

    name: str
    kind: str
    enabled: bool
    schedule: str | None  # "cron 0 2 * * *", "every 3600 s" or None (on demand only)
    bundles: list[str]  # empty: the node's deployed bundles
    floors: dict[str, dict[str, float | None]]
    window_days: float | None
    webhook: bool  # the URL itself may hold a secret: not shown
    last_run: RunInfo | None
    running_run_id: int | None
    next_run_at: float | None  # from the scheduler; None when not scheduled

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobFigures:
    """The latest succeeded run of a job with its figures and alerts (``latest_figures``)."""

    job_name: str
    kind: str
    run_id: int
    finished_at: float | None
    figures: list[LabelFigures] = field(default_factory=list)
    alerts: list[AlertInfo] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"job_name": self.job_name, "kind": self.kind, "run_id": self.run_id,
                "finished_at": self.finished_at, "figures": [f.as_dict() for f in self.figures],
                "alerts": [a.as_dict() for a in self.alerts]}


def default_bundle_loader(settings: Settings) -> Callable[[Sequence[Path]], Analyzer]:
    """Load bundles exactly as the node does (the one builder in :mod:`dicom_node.analysis`)."""
    return functools.partial(build_analyzer, settings)


def _models_json(models: Sequence[ModelIdentity], results: Sequence[ImageResult]
                 ) -> list[dict[str, Any]]:
    thresholds: dict[str, dict[str, float]] = defaultdict(dict)
    for r in results:
        for f in r.findings:
            thresholds[f.model.device_uid][f.label] = float(f.threshold)
    return [{"name": m.name, "version": m.version, "device_uid": m.device_uid, "task": m.task,
             "demo": m.demo, "thresholds": dict(sorted(thresholds[m.device_uid].items()))}
            for m in models]


def _read_box_map(boxes_json: Path | None, classes_txt: Path | None
                  ) -> tuple[dict[str, list[str]], list[str]]:
    """The YOLO JSON map and its class names; errors name the setting."""
    assert boxes_json is not None and classes_txt is not None
    try:
        doc = json.loads(boxes_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"reference.boxes_json {str(boxes_json)!r} cannot be read as "
                              f"JSON: {exc}") from exc
    if not isinstance(doc, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in doc.values()):
        raise EvaluationError(f"reference.boxes_json {str(boxes_json)!r} must be a JSON object "
                              "relative path -> ['class xc yc w h', ...]")
    try:
        classes = read_classes(classes_txt)
    except LabelError as exc:
        raise EvaluationError(f"reference.classes_txt: {exc}") from exc
    if not classes:
        raise EvaluationError(f"reference.classes_txt {str(classes_txt)!r} names no class")
    return doc, classes


class EvaluationService:
    """Evaluation jobs of one node.

    Args:
        engine: the node's database.
        settings: node settings (``evaluation`` jobs, ``studies.selection``, ``models``).
        deployed: returns the node's loaded analyzer, or None while it is still loading.
        model_error: returns why the deployed model failed to load, or None.
        bundle_loader: loads an analyzer for a job that names its own ``bundles``.
        stop_event: set when the node stops; runs end as failed ("interrupted").
    """

    def __init__(self, engine: Engine, settings: Settings, *,
                 deployed: Callable[[], Analyzer | None] | None = None,
                 model_error: Callable[[], str | None] | None = None,
                 bundle_loader: Callable[[Sequence[Path]], Analyzer] | None = None,
                 stop_event: threading.Event | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.config = settings.evaluation
        self.store = RunStore(engine, self.config.max_run_s)
        self._deployed = deployed or (lambda: None)
        self._model_error = model_error or (lambda: None)
        self._bundle_loader = bundle_loader or default_bundle_loader(settings)
        self.stop_event = stop_event or threading.Event()
        self._analyzers: dict[tuple[str, ...], Analyzer] = {}
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._catchup: dict[str, float] = {}
        self._next_run: Callable[[str], float | None] = lambda _name: None

    # -- jobs -------------------------------------------------------------------------------

    def job(self, name: str) -> EvaluationJobSettings:
        job = self.config.job(name)
        if job is None:
            known = ", ".join(j.name for j in self.config.jobs) or "none configured"
            raise UnknownJobError(f"unknown evaluation job {name!r} (configured: {known})")
        return job

    def list_jobs(self) -> list[JobInfo]:
        out = []
        for job in self.config.jobs:
            last = self.store.list_runs(job.name, limit=1)
            running = self.store.running(job.name)
            out.append(JobInfo(
                name=job.name, kind=job.kind, enabled=job.enabled,
                schedule=job.schedule.describe() if job.schedule else None,
                bundles=[str(b) for b in job.bundles],
                floors={k: v.model_dump() for k, v in job.floors.items()},
                window_days=(job.window_days or 30.0) if job.kind == "confirmed" else None,
                webhook=job.webhook_url is not None, last_run=last[0] if last else None,
                running_run_id=running.id if running else None,
                next_run_at=self._next_run(job.name)))
        return out

    def attach_scheduler(self, next_run: Callable[[str], float | None]) -> None:
        """Let ``list_jobs`` report the scheduler's next run times."""
        self._next_run = next_run

    def mark_catchup(self, job_name: str, missed_at: float) -> None:
        """The next scheduled execution of ``job_name`` is the catch-up of ``missed_at``."""
        self._catchup[job_name] = missed_at

    # -- runs -------------------------------------------------------------------------------

    def trigger_run(self, job_name: str, trigger: str = "api", *, wait: bool | None = None,
                    scheduled_for: float | None = None) -> int:
        """Start a run; returns its id at once (API) or after it ended (``wait``).

        ``wait`` defaults to False for ``trigger='api'`` (background thread) and True
        otherwise. Raises :class:`UnknownJobError` or :class:`EvaluationBusyError` (the job
        is running, here or in another process) before anything starts.
        """
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger {trigger!r} must be one of {', '.join(TRIGGERS)}")
        job = self.job(job_name)
        run_id = self.store.start_run(job.name, job.kind, trigger, scheduled_for)
        logger.info("evaluation job %s: run %d started (%s)", job.name, run_id, trigger)
        if wait is None:
            wait = trigger != "api"
        if wait:
            self._execute(job, run_id)
            return run_id
        thread = threading.Thread(target=self._execute, args=(job, run_id), daemon=True,
                                  name=f"evaluation-{run_id}")
        with self._lock:
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            self._threads[run_id] = thread
        thread.start()
        return run_id

    def run_now(self, job_name: str, trigger: str = "manual") -> RunDetail:
        """Run synchronously and return the stored outcome (the CLI's ``--now``)."""
        run_id = self.trigger_run(job_name, trigger, wait=True)
        detail = self.store.get_run(run_id)
        assert detail is not None
        return detail

    def run_scheduled(self, job_name: str) -> None:
        """APScheduler's entry point: never raises for a busy job (the run is coalesced)."""
        missed = self._catchup.pop(job_name, None)
        trigger = "schedule" if missed is None else "catchup"
        try:
            self.trigger_run(job_name, trigger, wait=True,
                             scheduled_for=missed if missed is not None else time.time())
        except EvaluationBusyError as exc:
            logger.warning("scheduled evaluation skipped: %s", exc)

    def wait(self, run_id: int, timeout: float | None = None) -> RunInfo | None:
        """Wait for a background run (tests, CLI helpers); returns its record."""
        with self._lock:
            thread = self._threads.get(run_id)
        if thread is not None:
            thread.join(timeout)
        detail = self.store.get_run(run_id)
        return detail.run if detail else None

    def _execute(self, job: EvaluationJobSettings, run_id: int) -> None:
        started = time.monotonic()
        try:
            figures, models, n_images, summary = self._compute(job)
            alerts = check_floors(figures, job.floors, job.name)
            self.store.finish_run(run_id, job.name, figures, alerts, models, n_images, summary)
        except Exception as exc:  # noqa: BLE001 - the edge: a failed-run record, never a crash
            error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EvaluationError):
                logger.exception("evaluation job %s run %d crashed", job.name, run_id)
            logger.error("evaluation job %s run %d failed: %s", job.name, run_id, error)
            self.store.fail_run(run_id, error)
            return
        logger.info("evaluation job %s run %d succeeded: %d case unit(s), %d label(s), "
                    "%d alert(s) in %.1f s", job.name, run_id, n_images, len(figures),
                    len(alerts), time.monotonic() - started)
        for a in alerts:
            logger.warning("evaluation ALERT job %s run %d: %s %s %s %.3f below floor %.3f",
                           job.name, run_id, a.model_name, a.label, a.metric, a.value, a.floor)
        if alerts and job.webhook_url:
            post_webhook(job.webhook_url, self._webhook_payload(job, run_id, alerts),
                         self.config.webhook_timeout_s)

    @staticmethod
    def _webhook_payload(job: EvaluationJobSettings, run_id: int, alerts: Sequence[Alert]
                         ) -> dict[str, Any]:
        return {"event": "evaluation_alert", "job": job.name, "kind": job.kind,
                "run_id": run_id, "alerts": [a.as_dict() for a in alerts]}

    def _compute(self, job: EvaluationJobSettings
                 ) -> tuple[list[LabelFigures], list[dict[str, Any]], int, dict[str, Any]]:
        if job.kind == "confirmed":
            outcome = confirmed_cases(self.engine, job.window_s, models=self._model_filter(job))
            return (compute_figures(outcome.cases), outcome.models, outcome.n_images,
                    outcome.summary)
        ref = job.reference
        assert ref is not None
        files = [(ref.dicom_dir, "dicom_dir"), (ref.labels_csv, "labels_csv")]
        if ref.boxes_json is not None and ref.classes_path is not None:
            files += [(ref.boxes_json, "boxes_json"), (ref.classes_path, "classes_txt")]
        for path, what in files:
            if not path.exists():
                raise EvaluationError(f"reference {what} {str(path)!r} does not exist")
        analyzer = self._analyzer_for(job)
        detection = [m.display_name for m in analyzer.models if m.task == "detection"]
        if detection and ref.boxes_json is None:
            raise EvaluationError(
                f"detection bundle(s) {', '.join(detection)} need reference boxes: set "
                f"reference.boxes_json (YOLO JSON map) in evaluation job {job.name!r}")
        box_map = _read_box_map(ref.boxes_json, ref.classes_path) if detection else None
        result = evaluate_reference(ref.dicom_dir, ref.labels_csv, analyzer,
                                    self.settings.studies.selection, self.stop_event)
        figures = [replace(f, localisation=result.localisation.get(
                       (f.model_name, f.model_version, f.label)) if result.localisation else None)
                   for f in compute_figures(result.cases)]
        summary = result.summary
        if box_map is not None:
            doc, classes = box_map
            try:
                truth = reference_boxes(doc, result.images, classes)
            except ValueError as exc:
                raise EvaluationError(f"reference.boxes_json: {exc}") from exc
            if not truth:
                raise EvaluationError(
                    f"reference.boxes_json {str(ref.boxes_json)!r} names none of the "
                    f"{len(result.images)} analysed image(s) (keys are paths relative to "
                    "reference.dicom_dir)")
            figures += detection_figures(result.results, truth)
            summary = {**summary, "images_with_box_truth": len(truth),
                       "reference_boxes": sum(len(b) for b in truth.values())}
        return (figures, _models_json(analyzer.models, result.results), len(result.results),
                summary)

    # -- models -----------------------------------------------------------------------------

    def _uses_deployed(self, job: EvaluationJobSettings) -> bool:
        if not job.bundles:
            return True
        return [p.resolve() for p in job.bundles] == [
            p.resolve() for p in self.settings.bundle_dirs]

    def _analyzer_for(self, job: EvaluationJobSettings) -> Analyzer:
        if self._uses_deployed(job):
            return self._wait_deployed()
        key = tuple(str(p.resolve()) for p in job.bundles)
        with self._lock:
            if key not in self._analyzers:  # loaded once, kept for the next runs
                self._analyzers[key] = self._bundle_loader(job.bundles)
            return self._analyzers[key]

    def _wait_deployed(self) -> Analyzer:
        deadline = time.monotonic() + self.config.model_wait_s
        while True:
            analyzer = self._deployed()
            if analyzer is not None:
                return analyzer
            error = self._model_error()
            if error:
                raise EvaluationError(f"the deployed model could not be loaded: {error}")
            if time.monotonic() >= deadline:
                raise EvaluationError(f"the deployed model was not loaded after "
                                      f"{self.config.model_wait_s:g} s")
            if self.stop_event.wait(0.2):
                raise EvaluationInterrupted("interrupted: the node is stopping")

    def _model_filter(self, job: EvaluationJobSettings) -> set[tuple[str, str]] | None:
        if not job.bundles:
            return None
        from ai.bundle.metadata import read_metadata

        metas = [read_metadata(Path(d)) for d in job.bundles]
        return {(m.name, m.version) for m in metas}

    # -- confirmed labels -------------------------------------------------------------------

    def post_confirmed_labels(self, key_kind: str, key_uid: str, labels: Mapping[str, int],
                              source: str = "api") -> int:
        """Store ground truth for a study (``key_kind='study'``) or an image (``'sop'``).

        Returns the number of labels stored (a label already known for the key is replaced).
        Raises :class:`ConfirmedLabelError` (a ``ValueError``) naming the bad argument.
        """
        n = store_confirmed(self.engine, validate_labels(key_kind, key_uid, labels), source)
        logger.info("confirmed labels: %d label(s) for %s %s from %s", n, key_kind, key_uid,
                    source)
        return n

    def process_confirmed_folder(self) -> list[DropOutcome]:
        """Import the CSV files in ``evaluation.confirmed_watch_dir`` (scheduler job)."""
        folder = self.config.confirmed_watch_dir
        if folder is None:
            return []
        return process_drop_folder(self.engine, folder, self.config.confirmed_settle_s)

    # -- reading (web API) ------------------------------------------------------------------

    def list_runs(self, job_name: str | None = None, state: str | None = None,
                  limit: int = 50, offset: int = 0) -> list[RunInfo]:
        return self.store.list_runs(job_name, state, limit, offset)

    def get_run(self, run_id: int) -> RunDetail | None:
        return self.store.get_run(run_id)

    def history(self, job_name: str, label: str | None = None, limit: int = 100
                ) -> list[tuple[RunInfo, LabelFigures]]:
        self.job(job_name)
        return self.store.history(job_name, label, limit)

    def list_alerts(self, *, job_name: str | None = None, open_only: bool = True,
                    limit: int = 100) -> list[AlertInfo]:
        return self.store.list_alerts(job_name=job_name, open_only=open_only, limit=limit)

    def acknowledge_alert(self, alert_id: int) -> bool:
        return self.store.acknowledge_alert(alert_id)

    def latest_figures(self) -> list[JobFigures]:
        """Per configured job, its latest succeeded run's figures (for ``/metrics``)."""
        out = []
        for job in self.config.jobs:
            detail = self.store.latest_succeeded(job.name)
            if detail is not None:
                out.append(JobFigures(job.name, job.kind, detail.run.id,
                                      detail.run.finished_at, detail.figures, detail.alerts))
        return out

    def recover_interrupted(self) -> list[int]:
        return self.store.recover_interrupted()

    def close(self, timeout: float = 10.0) -> None:
        """Stop background runs (they end as failed "interrupted") and wait for them."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
