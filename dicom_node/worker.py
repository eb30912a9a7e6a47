"""The analysis worker: claim a job, run the models, build SR/SC/GSPS, queue deliveries.

Everything a job produces is committed in one transaction at the end, after the result
files are on disk; output UIDs derive from the inputs and the models, so a job re-run after
a crash rewrites the same files and the same rows instead of creating a second result set.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from sqlalchemy import Engine, delete, insert, select

from ai.batches import analyse_isolating
from ai.types import (
    AnalysisError,
    Analyzer,
    ImageResult,
    PixelDataError,
    ResourceExhaustedError,
)
from dicom_node.config import Destination
from dicom_node.delivery.ledger import add_delivery
from dicom_node.dicomio import read_untrusted
from dicom_node.jobs import ClaimedJob, JobQueue
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs
from dicom_node.phi import remember_phi
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.store.states import InstanceState, JobState
from dicom_node.store.transitions import analysed_instances, fail_instance, finish_job
from dicom_node.versions import (
    PriorOutput,
    current_outputs,
    link_predecessors,
    series_seed,
    supersede,
    uid_seed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    state: str
    outputs: int = 0


def findings_summary(results: Sequence[ImageResult]) -> str:
    """``2 positive finding(s) (cardiomegaly, nodule)``, labels once each, for the log."""
    positive = [f for r in results for f in r.positive_findings]
    labels = ", ".join(dict.fromkeys(f.label for f in positive))
    return f"{len(positive)} positive finding(s)" + (f" ({labels})" if labels else "")


class AnalysisWorker:
    def __init__(self, engine: Engine, spool: Spool, queue: JobQueue, analyzer: Analyzer,
                 output_settings: OutputSettings, destinations: Sequence[Destination]) -> None:
        self.engine = engine
        self.spool = spool
        self.queue = queue
        self.analyzer = analyzer
        self.output_settings = output_settings
        self.destinations = list(destinations)

    def process_one(self, owner: str) -> JobOutcome | None:
        job = self.queue.claim(owner)
        if job is None:
            return None
        with self.queue.lease(job):  # heartbeat: the lease is renewed while the job runs
            return self._attempt(job)

    def _attempt(self, job: ClaimedJob) -> JobOutcome:
        started = time.monotonic()
        try:
            return self._run(job, started)
        except ResourceExhaustedError as exc:  # out of memory: transient, retried later
            return JobOutcome(job.id, self.queue.fail(job, f"{type(exc).__name__}: {exc}",
                                                      permanent=False))
        except (AnalysisError, pydicom.errors.InvalidDicomError) as exc:
            return JobOutcome(job.id, self.queue.fail(job, f"{type(exc).__name__}: {exc}",
                                                      permanent=True))
        except Exception as exc:  # noqa: BLE001 - the edge: recorded, retried, never lost
            logger.exception("job %d crashed", job.id)
            return JobOutcome(job.id, self.queue.fail(job, f"{type(exc).__name__}: {exc}",
                                                      permanent=False))

    def _load(self, job: ClaimedJob) -> list[tuple[int, pydicom.Dataset]]:
        """Every analysable image of the study up to this job: its own new ones and those
        earlier jobs took (a later job's result supersedes theirs). Images that retention
        has removed from the spool are no longer there to analyse: the new version covers
        the images still held."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.instances.c.id, db.instances.c.path)
                                .where(db.instances.c.study_uid == job.study_uid)
                                .where(db.instances.c.job_id <= job.id)
                                .where(db.instances.c.purged_at.is_(None))
                                .where(db.instances.c.analysis_state.in_(
                                    (InstanceState.SELECTED, InstanceState.ANALYSED)))
                                .order_by(db.instances.c.id)).all()
        return [(r.id, remember_phi(read_untrusted(self.spool.path(r.path)))) for r in rows]

    def _analyze(self, loaded: list[tuple[int, pydicom.Dataset]]
                 ) -> tuple[list[tuple[int, pydicom.Dataset, ImageResult]], dict[int, str]]:
        outcomes = analyse_isolating(self.analyzer, [ds for _, ds in loaded])
        good, bad = [], {}
        for (inst_id, ds), outcome in zip(loaded, outcomes, strict=True):
            if isinstance(outcome, PixelDataError):
                bad[inst_id] = f"pixel data unusable: {outcome}"
            else:
                good.append((inst_id, ds, outcome))
        if not good:
            if len(outcomes) == 1 and isinstance(outcomes[0], PixelDataError):
                raise outcomes[0]  # one image: its own error, as the analyzer raised it
            raise PixelDataError("; ".join(bad.values()))
        return good, bad

    def _run(self, job: ClaimedJob, started: float) -> JobOutcome:
        loaded = self._load(job)
        if not loaded:
            raise AnalysisError("job has no instances")
        analysed, bad = self._analyze(loaded)
        models = self.analyzer.models
        seed = uid_seed([str(ds.SOPInstanceUID) for _, ds, _ in analysed], models)
        objects = build_outputs([(ds, r) for _, ds, r in analysed], self.output_settings, seed,
                                series_seed=series_seed(job.study_uid, models))
        with self.engine.connect() as conn:
            prior = current_outputs(conn, job.study_uid, other_than_job=job.id)
        link_predecessors(objects, prior)
        stored = [(obj, self._write(obj)) for obj in objects]
        self._commit(job, analysed, bad, stored, prior, time.monotonic() - started)
        logger.info("study %s analysed (job %d): %d image(s), %s, %d result object(s) in "
                    "%.2f s", job.study_uid, job.id, len(analysed),
                    findings_summary([r for _, _, r in analysed]), len(objects),
                    time.monotonic() - started)
        return JobOutcome(job.id, JobState.DONE, len(objects))

    def _write(self, obj: OutputObject) -> str:
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, obj.dataset, enforce_file_format=True)
        return self.spool.store_result(obj.sop_instance_uid, buf.getvalue()).relpath

    def _commit(self, job: ClaimedJob, analysed: list[tuple[int, pydicom.Dataset, ImageResult]],
                bad: dict[int, str], stored: list[tuple[OutputObject, str]],
                prior: list[PriorOutput], duration: float) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            if not self.queue.still_owned(conn, job):
                logger.warning("job %d lost its lease before commit; results discarded", job.id)
                return
            conn.execute(delete(db.findings).where(db.findings.c.job_id == job.id))
            for _, _, result in analysed:
                for f in result.findings:
                    box = f.box
                    conn.execute(insert(db.findings).values(
                        job_id=job.id, sop_instance_uid=result.sop_instance_uid,
                        label=f.label, code_value=f.concept.value, code_scheme=f.concept.scheme,
                        code_meaning=f.concept.meaning, probability=float(f.probability),
                        threshold=float(f.threshold), positive=bool(f.positive),
                        box_x0=box.x0 if box else None, box_y0=box.y0 if box else None,
                        box_x1=box.x1 if box else None, box_y1=box.y1 if box else None,
                        model_name=f.model.name, model_version=f.model.version,
                        device_uid=f.model.device_uid, model_demo=f.model.demo))
            for obj, relpath in stored:
                self._record_output(conn, job, obj, relpath, now)
            for inst_id, reason in bad.items():
                fail_instance(conn, inst_id, reason)
            analysed_instances(conn, [i for i, _, _ in analysed])
            replaced = supersede(conn, job.id, prior,
                                 {obj.sop_instance_uid for obj, _ in stored}, now)
            finish_job(conn, job.id, job.study_uid, duration, now)
        if replaced:
            logger.info("study %s result v%d supersedes %s (job %d)", job.study_uid,
                        job.version, ", ".join(f"v{v}" for v in replaced), job.id)

    def _record_output(self, conn, job: ClaimedJob, obj: OutputObject,  # type: ignore[no-untyped-def]
                       relpath: str, now: float) -> None:
        row = conn.execute(select(db.outputs.c.id).where(
            db.outputs.c.sop_instance_uid == obj.sop_instance_uid)).first()
        if row is None:
            output_id = conn.execute(insert(db.outputs).values(
                job_id=job.id, kind=obj.kind, sop_instance_uid=obj.sop_instance_uid,
                sop_class_uid=obj.sop_class_uid, series_uid=str(obj.dataset.SeriesInstanceUID),
                study_uid=str(obj.dataset.StudyInstanceUID), path=relpath, created_at=now)
            ).inserted_primary_key[0]
        else:
            output_id = row.id
        for dest in self.destinations:
            if obj.kind not in dest.outputs:  # this destination does not take this kind
                continue
            add_delivery(conn, output_id, dest.name, now)
