"""Configuration of the evaluation jobs (the ``evaluation`` section of the node settings).

Example::

    evaluation:
      confirmed_watch_dir: /srv/cxr/confirmed
      jobs:
        - name: nightly-reference
          kind: reference
          reference: {dicom_dir: /srv/refset, labels_csv: /srv/refset/labels.csv,
                      boxes_json: /srv/refset/boxes.json}  # boxes: detection bundles only
          schedule: {cron: "0 2 * * *"}
          floors: {nodule: {sensitivity: 0.8, specificity: 0.7}}
        - name: live-confirmed
          kind: confirmed
          window_days: 30
          schedule: {interval_s: 86400}

Only the format is checked here (so ``check-config`` catches typos); whether the reference
files exist is checked when a run starts, because a share may be mounted later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FLOOR_METRICS = ("sensitivity", "specificity")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleSettings(_Model):
    """Exactly one of ``cron`` (5-field crontab, in ``evaluation.timezone``) or ``interval_s``."""

    cron: str | None = None
    interval_s: float | None = Field(None, gt=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            CronTrigger.from_crontab(v, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"cron expression {v!r} is invalid: {exc}") from exc
        return v.strip()

    @model_validator(mode="after")
    def _one(self) -> ScheduleSettings:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("schedule needs exactly one of cron or interval_s, e.g. "
                             "{cron: '0 2 * * *'} or {interval_s: 86400}")
        return self

    def describe(self) -> str:
        return f"cron {self.cron}" if self.cron else f"every {self.interval_s:g} s"


class ReferenceSetSettings(_Model):
    """A folder of DICOM plus a label CSV in the format ``training`` reads.

    ``boxes_json`` (optional; needed by detection bundles): the reference boxes as the
    YOLO JSON map ``training`` reads (path relative to ``dicom_dir`` -> ["class xc yc w h",
    ...], an empty list for a negative image), class names from ``classes_txt`` (default:
    ``classes.txt`` beside the map). Only images that are also in ``labels_csv`` are
    analysed; an analysed image the map does not name is left out of the box figures.
    """

    dicom_dir: Path
    labels_csv: Path
    boxes_json: Path | None = None
    classes_txt: Path | None = None  # None: classes.txt beside boxes_json

    @field_validator("boxes_json")
    @classmethod
    def _boxes(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix.lower() != ".json":
            raise ValueError(f"reference.boxes_json {str(v)!r} must be a YOLO JSON map "
                             "(.json file: relative path -> ['class xc yc w h', ...])")
        return v

    @model_validator(mode="after")
    def _classes(self) -> ReferenceSetSettings:
        if self.classes_txt is not None and self.boxes_json is None:
            raise ValueError(f"reference.classes_txt {str(self.classes_txt)!r} is only used "
                             "with reference.boxes_json")
        return self

    @property
    def classes_path(self) -> Path | None:
        """The class list of ``boxes_json`` (None without boxes)."""
        if self.boxes_json is None:
            return None
        return self.classes_txt or self.boxes_json.parent / "classes.txt"


class FloorSettings(_Model):
    """Minimum acceptable point estimates for one label; a run below one raises an alert."""

    sensitivity: float | None = Field(None, ge=0, le=1)
    specificity: float | None = Field(None, ge=0, le=1)


class EvaluationJobSettings(_Model):
    name: str
    kind: Literal["reference", "confirmed"]
    bundles: list[Path] = Field(default_factory=list)  # empty: the node's deployed bundles
    reference: ReferenceSetSettings | None = None  # kind reference
    window_days: float | None = Field(None, gt=0)  # kind confirmed (default 30)
    schedule: ScheduleSettings | None = None  # None: on demand only
    floors: dict[str, FloorSettings] = Field(default_factory=dict)
    webhook_url: str | None = None
    misfire_grace_s: float = Field(3600.0, gt=0)
    catchup: bool = True  # run once at start-up when a scheduled run was missed while down
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"job name {v!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"webhook_url {v!r} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _kind(self) -> EvaluationJobSettings:
        if self.kind == "reference":
            if self.reference is None:
                raise ValueError(f"job {self.name!r}: kind reference needs "
                                 "reference: {dicom_dir: ..., labels_csv: ...}")
            if self.window_days is not None:
                raise ValueError(f"job {self.name!r}: window_days is for kind confirmed")
        elif self.reference is not None:
            raise ValueError(f"job {self.name!r}: reference is for kind reference")
        return self

    @property
    def window_s(self) -> float:
        return (self.window_days or 30.0) * 86400.0


class EvaluationSettings(_Model):
    enabled: bool = True  # False: no scheduler (runs on demand still work)
    timezone: str | None = None  # for cron schedules; None = the host's local zone
    confirmed_watch_dir: Path | None = None  # CSV drop folder for confirmed labels
    confirmed_poll_s: float = Field(30.0, gt=0)
    confirmed_settle_s: float = Field(2.0, ge=0)  # files younger than this may be half-written
    model_wait_s: float = Field(900.0, ge=0)  # how long a run waits for the model to load
    max_run_s: float = Field(21600.0, gt=0)  # a 'running' run of another host older than this
    webhook_timeout_s: float = Field(10.0, gt=0)
    jobs: list[EvaluationJobSettings] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {v!r} is not a known IANA zone") from exc
        return v

    @model_validator(mode="after")
    def _unique(self) -> EvaluationSettings:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"evaluation job name {job.name!r} is used twice")
            seen.add(job.name)
        return self

    def job(self, name: str) -> EvaluationJobSettings | None:
        return next((j for j in self.jobs if j.name == name), None)
