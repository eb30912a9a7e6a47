"""The analysis worker: claim a job, run the models, build SR/SC/GSPS, queue deliveries.

Everything a job produces is committed in one transaction at the end, after the result
files are on disk; output UIDs derive from the inputs and the models, so a job re-run after
a crash rewrites the same files and the same rows instead of creating a second result set.

A worker takes the jobs already queued in one claim (``workers.batch_jobs``) and analyses
all their images in one analyzer call: the model's fixed cost per call is shared, and each
job still builds, commits or fails on its own. The same worker runs as a thread of the node
or as a process of its own (:mod:`dicom_node.worker_process`).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TypeVar

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
from dicom_node.config import Destination, Settings
from dicom_node.delivery.ledger import add_delivery
from dicom_node.dicomio import read_untrusted
from dicom_node.jobs import ClaimedJob, JobQueue
from dicom_node.ood_records import record_verdicts
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

T = TypeVar("T")


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    state: str
    outputs: int = 0


def output_settings(settings: Settings) -> OutputSettings:
    """The outputs the worker builds, from the node's ``outputs.*`` settings."""
    o = settings.outputs
    return OutputSettings(sr=o.sr, sc=o.sc, gsps=o.gsps, seg=o.seg, seg_type=o.seg_type,
                          institution_name=o.institution_name,
                          heatmap_alpha=o.heatmap_alpha, sr_candidates=o.sr_candidates,
                          sc_transfer_syntax=str(o.sc_transfer_syntax), sc_max_side=o.sc_max_side)


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
        outcomes = self.process_batch(owner, 1)
        return outcomes[0] if outcomes else None

    def process_batch(self, owner: str, limit: int, wait_s: float = 0.0,
                      stop: threading.Event | None = None) -> list[JobOutcome]:
        """Claim up to ``limit`` queued jobs and analyse all their images in one call.

        Batching amortises the model's per-call cost over studies that are already waiting;
        it adds no latency beyond ``wait_s`` (0: what is queued now is taken, nothing is
        awaited). Each job keeps its own lease, outputs, commit and failure: one job's
        unreadable study or bad image never fails the others.
        """
        jobs = self.queue.claim_many(owner, limit)
        if not jobs:
            return []
        if len(jobs) < limit and wait_s > 0 and not (stop or threading.Event()).wait(wait_s):
            jobs += self.queue.claim_many(owner, limit - len(jobs))
        with ExitStack() as leases:
            for job in jobs:  # heartbeat per job: each lease is renewed while the batch runs
                leases.enter_context(self.queue.lease(job))
            return self._run_batch(jobs)

    def _run_batch(self, jobs: list[ClaimedJob]) -> list[JobOutcome]:
        started = time.monotonic()
        outcomes: dict[int, JobOutcome] = {}
        loaded: dict[int, list[tuple[int, pydicom.Dataset]]] = {}
        for job in jobs:
            images, failed = self._attempt(job, lambda j=job: self._load_some(j))
            if failed is not None:
                outcomes[job.id] = failed
            else:
                loaded[job.id] = images
        for job_id, (images, results) in self._analyse_together(jobs, loaded, outcomes).items():
            job = next(j for j in jobs if j.id == job_id)
            done, failed = self._attempt(job, lambda j=job, i=images, r=results: self._finish(
                j, i, r, started))
            outcomes[job.id] = failed or done
        return [outcomes[job.id] for job in jobs]

    def _analyse_together(self, jobs: list[ClaimedJob],
                          loaded: dict[int, list[tuple[int, pydicom.Dataset]]],
                          outcomes: dict[int, JobOutcome]) -> dict[int, tuple[
                              list[tuple[int, pydicom.Dataset]],
                              list[ImageResult | PixelDataError]]]:
        """Each loaded job's images with their results, from one analyzer call for them all.

        When that call fails as a whole (not one unusable image: ``analyse_isolating``
        isolates those), each job is analysed alone, so the error stays with its job."""
        together = [ds for images in loaded.values() for _, ds in images]
        try:
            results = analyse_isolating(self.analyzer, together) if len(loaded) > 1 else None
        except Exception:  # noqa: BLE001 - retried job by job below, each recording its own
            logger.warning("batch of %d jobs failed as a whole; analysing each alone",
                           len(loaded))
            results = None
        found: dict[int, tuple[list[tuple[int, pydicom.Dataset]],
                               list[ImageResult | PixelDataError]]] = {}
        offset = 0
        for job in jobs:
            images = loaded.get(job.id)
            if images is None:
                continue
            if results is not None:
                found[job.id] = (images, results[offset:offset + len(images)])
                offset += len(images)
                continue
            mine, failed = self._attempt(job, lambda i=images: analyse_isolating(
                self.analyzer, [ds for _, ds in i]))
            if failed is not None:
                outcomes[job.id] = failed
            else:
                found[job.id] = (images, mine or [])
        return found

    def _attempt(self, job: ClaimedJob, step: Callable[[], T]
                 ) -> tuple[T | None, JobOutcome | None]:
        """``step()``'s value, or the job's recorded failure when it raised."""
        try:
            return step(), None
        except Exception as exc:  # noqa: BLE001 - the edge: recorded, retried, never lost
            return None, self._failed(job, exc)

    def _failed(self, job: ClaimedJob, exc: Exception) -> JobOutcome:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ResourceExhaustedError):  # out of memory: transient, retried later
            return JobOutcome(job.id, self.queue.fail(job, error, permanent=False))
        if isinstance(exc, (AnalysisError, pydicom.errors.InvalidDicomError)):
            return JobOutcome(job.id, self.queue.fail(job, error, permanent=True))
        logger.error("job %d crashed", job.id, exc_info=exc)
        return JobOutcome(job.id, self.queue.fail(job, error, permanent=False))

    def _load_some(self, job: ClaimedJob) -> list[tuple[int, pydicom.Dataset]]:
        loaded = self._load(job)
        if not loaded:
            raise AnalysisError("job has no instances")
        return loaded

    def _load(self, job: ClaimedJob) -> list[tuple[int, pydicom.Dataset]]:
        """Every analysable image of the study up to this job: its own new ones and those
        earlier jobs took (a later job's result supersedes theirs). Images that retention
        has removed from the spool are no longer there to analyse: the new version covers
        the images still held."""
        with db.reading(self.engine) as conn:
            rows = conn.execute(select(db.instances.c.id, db.instances.c.path)
                                .where(db.instances.c.study_uid == job.study_uid)
                                .where(db.instances.c.job_id <= job.id)
                                .where(db.instances.c.purged_at.is_(None))
                                .where(db.instances.c.analysis_state.in_(
                                    (InstanceState.SELECTED, InstanceState.ANALYSED)))
                                .order_by(db.instances.c.id)).all()
        return [(r.id, remember_phi(read_untrusted(self.spool.path(r.path)))) for r in rows]

    @staticmethod
    def _split(loaded: list[tuple[int, pydicom.Dataset]],
               outcomes: Sequence[ImageResult | PixelDataError]
               ) -> tuple[list[tuple[int, pydicom.Dataset, ImageResult]], dict[int, str]]:
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

    def _finish(self, job: ClaimedJob, loaded: list[tuple[int, pydicom.Dataset]],
                outcomes: Sequence[ImageResult | PixelDataError], started: float
                ) -> JobOutcome:
        analysed, bad = self._split(loaded, outcomes)
        models = self.analyzer.models
        seed = uid_seed([str(ds.SOPInstanceUID) for _, ds, _ in analysed], models)
        objects = build_outputs([(ds, r) for _, ds, r in analysed], self.output_settings, seed,
                                series_seed=series_seed(job.study_uid, models))
        with db.reading(self.engine) as conn:
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
        now = self.queue.clock.now()  # next_attempt_at is compared on the database's clock
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
            record_verdicts(conn, job.id, [r for _, _, r in analysed])
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
