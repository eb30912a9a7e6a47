"""The node's APScheduler: evaluation jobs and the confirmed-labels drop folder.

Overlap: each job is one APScheduler job with ``max_instances=1`` (a fire while the previous
run is still going is skipped with APScheduler's warning), and the database guard in
:class:`~dicom_node.evaluation.store.RunStore` refuses a second running row of the same job
from any source (API, ``dicom-node evaluate --now`` in another process, a catch-up).

Missed runs: while the node runs, ``coalesce=True`` folds several overdue fires into one
and ``misfire_grace_time`` bounds how late a fire may still start. While the node is *down*
the in-memory scheduler knows nothing, so at start-up each job's last run time is compared
with its schedule: if at least one fire time passed unobserved, the job runs once at once
with ``trigger='catchup'`` (logged with the number of missed fires), then resumes its
schedule. A job that never ran has nothing to catch up.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from tzlocal import get_localzone

from dicom_node.evaluation.service import EvaluationService
from dicom_node.evaluation.settings import EvaluationSettings, ScheduleSettings

logger = logging.getLogger(__name__)

MAX_COUNTED_MISSES = 10_000  # beyond this the log says "at least"


def scheduler_timezone(settings: EvaluationSettings) -> tzinfo:
    return ZoneInfo(settings.timezone) if settings.timezone else get_localzone()


def build_trigger(schedule: ScheduleSettings, tz: tzinfo) -> BaseTrigger:
    if schedule.cron:
        return CronTrigger.from_crontab(schedule.cron, timezone=tz)
    assert schedule.interval_s is not None
    return IntervalTrigger(seconds=schedule.interval_s, timezone=tz)


def missed_fire_times(schedule: ScheduleSettings, tz: tzinfo, last_run: float, now: float,
                      limit: int = MAX_COUNTED_MISSES) -> list[float]:
    """Fire times of ``schedule`` after ``last_run`` (a run start) and up to ``now``."""
    if schedule.interval_s is not None:
        step = schedule.interval_s
        count = min(limit, int((now - last_run) // step)) if now > last_run else 0
        return [last_run + step * k for k in range(1, count + 1)]
    trigger = build_trigger(schedule, tz)
    moment = datetime.fromtimestamp(last_run + 1.0, tz)  # the slot that run served is <= it
    end = datetime.fromtimestamp(now, tz)
    out: list[float] = []
    fire = trigger.get_next_fire_time(None, moment)
    while fire is not None and fire <= end and len(out) < limit:
        out.append(fire.timestamp())
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return out


class EvaluationScheduler:
    """A started BackgroundScheduler running the configured evaluation jobs."""

    def __init__(self, service: EvaluationService, settings: EvaluationSettings) -> None:
        self.service = service
        self.settings = settings
        self.tz = scheduler_timezone(settings)
        self.scheduler = BackgroundScheduler(timezone=self.tz)

    def start(self, now: float | None = None) -> EvaluationScheduler:
        now = time.time() if now is None else now
        for job in self.settings.jobs:
            if job.enabled and job.schedule is not None:
                self._add(job.name, job.schedule, job.misfire_grace_s, job.catchup, now)
        folder = self.settings.confirmed_watch_dir
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.scheduler.add_job(
                self.service.process_confirmed_folder,
                IntervalTrigger(seconds=self.settings.confirmed_poll_s, timezone=self.tz),
                id="evaluation:confirmed-watch", name="confirmed labels drop folder",
                max_instances=1, coalesce=True, next_run_time=datetime.now(self.tz))
            logger.info("watching %s for confirmed-label CSV files every %g s", folder,
                        self.settings.confirmed_poll_s)
        self.scheduler.start()
        self.service.attach_scheduler(self.next_run_time)
        return self

    def _add(self, name: str, schedule: ScheduleSettings, grace_s: float, catchup: bool,
             now: float) -> None:
        options: dict[str, Any] = {}
        last = self.service.store.last_started(name)
        if catchup and last is not None:
            missed = missed_fire_times(schedule, self.tz, last, now)
            if missed:
                more = "at least " if len(missed) >= MAX_COUNTED_MISSES else ""
                logger.warning(
                    "evaluation job %s: %s%d scheduled run(s) missed while the node was down "
                    "(last run %s, missed %s .. %s); running it once now (catch-up)", name,
                    more, len(missed), _iso(last, self.tz), _iso(missed[0], self.tz),
                    _iso(missed[-1], self.tz))
                self.service.mark_catchup(name, missed[-1])
                options["next_run_time"] = datetime.now(self.tz)
            elif schedule.interval_s is not None:  # keep the cadence across a restart
                options["next_run_time"] = datetime.fromtimestamp(last + schedule.interval_s,
                                                                  self.tz)
        self.scheduler.add_job(
            self.service.run_scheduled, build_trigger(schedule, self.tz), args=[name],
            id=f"evaluation:{name}", name=f"evaluation {name}", max_instances=1,
            coalesce=True, misfire_grace_time=max(1, round(grace_s)), **options)
        logger.info("evaluation job %s scheduled (%s)", name, schedule.describe())

    def next_run_time(self, job_name: str) -> float | None:
        job = self.scheduler.get_job(f"evaluation:{job_name}")
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when.timestamp() if when is not None else None

    def shutdown(self, wait: bool = True) -> None:
        """Stop firing; with ``wait`` let running executions end (they honour the node's
        stop event, so an evaluation stops at the next study)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)


def _iso(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def start_evaluation_scheduler(service: EvaluationService, settings: EvaluationSettings
                               ) -> EvaluationScheduler | None:
    """Recover interrupted runs, then start the scheduler if there is anything to schedule."""
    service.recover_interrupted()
    if not settings.enabled:
        logger.info("evaluation scheduler disabled (evaluation.enabled: false)")
        return None
    scheduled = [j for j in settings.jobs if j.enabled and j.schedule is not None]
    if not scheduled and settings.confirmed_watch_dir is None:
        return None
    return EvaluationScheduler(service, settings).start()
