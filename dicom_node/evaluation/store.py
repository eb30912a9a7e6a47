"""Evaluation runs, figures and alerts in the node's database.

The guard against overlapping runs lives in the database, so it holds across threads,
processes (``dicom-node evaluate --now`` next to ``serve``) and hosts: a partial unique
index allows one ``running`` row per job. A run whose process died (kill -9, power loss)
would block its job forever, so each running row names its owner (host, pid and a
per-process token) and a row whose owner is gone is marked failed ("interrupted") at
start-up and whenever it stands in the way of a new run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, Index, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from ai.reference.metrics import Estimate
from dicom_node.evaluation.alerts import Alert
from dicom_node.evaluation.errors import EvaluationBusyError
from dicom_node.evaluation.figures import LabelFigures
from dicom_node.store import db
from dicom_node.store.states import RunState

logger = logging.getLogger(__name__)

_PROCESS_TOKEN = secrets.token_hex(6)  # tells this process from an earlier one with the same pid
MAX_ERROR_CHARS = 2000


def process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _nan_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class RunInfo:
    """One ``evaluation_runs`` row as the API shows it."""

    id: int
    job_name: str
    kind: str
    trigger: str
    state: str
    scheduled_for: float | None
    started_at: float
    finished_at: float | None
    error: str | None
    n_images: int | None
    models: list[dict[str, Any]]
    alerts: int
    summary: dict[str, Any] | None

    @classmethod
    def from_row(cls, r: Any) -> RunInfo:
        return cls(r.id, r.job_name, r.kind, r.trigger, r.state, r.scheduled_for, r.started_at,
                   r.finished_at, r.error, r.n_images, json.loads(r.models or "[]"),
                   r.alerts or 0, json.loads(r.summary) if r.summary else None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlertInfo:
    """One ``evaluation_alerts`` row."""

    id: int
    run_id: int
    job_name: str
    model_name: str
    label: str
    metric: str
    value: float | None
    floor: float
    created_at: float
    acknowledged_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunDetail:
    """A run with its per-label figures and its alerts."""

    run: RunInfo
    figures: list[LabelFigures] = field(default_factory=list)
    alerts: list[AlertInfo] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run.as_dict(), "figures": [f.as_dict() for f in self.figures],
                "alerts": [a.as_dict() for a in self.alerts]}


def _estimate(r: Any, name: str) -> Estimate:
    def f(v: float | None) -> float:
        return math.nan if v is None else float(v)
    return Estimate(f(getattr(r, name)), f(getattr(r, f"{name}_lo")), f(getattr(r, f"{name}_hi")))


def figures_from_row(r: Any) -> LabelFigures:
    return LabelFigures(
        model_name=r.model_name, model_version=r.model_version, label=r.label,
        threshold=r.threshold, n_pos=r.n_pos, n_neg=r.n_neg, tp=r.tp, fp=r.fp, tn=r.tn, fn=r.fn,
        sensitivity=_estimate(r, "sensitivity"), specificity=_estimate(r, "specificity"),
        ppv=_estimate(r, "ppv"), npv=_estimate(r, "npv"), f1=r.f1, auroc=_estimate(r, "auroc"),
        roc=[tuple(p) for p in json.loads(r.roc or "[]")], ap50=r.ap50,
        froc=[tuple(p) for p in json.loads(r.froc)] if r.froc else None,
        localisation=json.loads(r.localisation) if getattr(r, "localisation", None) else None)


def _metrics_values(run_id: int, f: LabelFigures) -> dict[str, Any]:
    values: dict[str, Any] = {
        "run_id": run_id, "model_name": f.model_name, "model_version": f.model_version,
        "label": f.label, "threshold": f.threshold, "n_pos": f.n_pos, "n_neg": f.n_neg,
        "tp": f.tp, "fp": f.fp, "tn": f.tn, "fn": f.fn, "f1": _nan_none(f.f1),
        "ap50": _nan_none(f.ap50), "roc": _json([list(p) for p in f.roc]),
        "froc": None if f.froc is None else _json([list(p) for p in f.froc]),
        "localisation": None if f.localisation is None else _json(f.localisation)}
    for name in ("sensitivity", "specificity", "ppv", "npv", "auroc"):
        est: Estimate = getattr(f, name)
        values[name] = _nan_none(est.value)
        values[f"{name}_lo"] = _nan_none(est.lower)
        values[f"{name}_hi"] = _nan_none(est.upper)
    return values


class RunStore:
    """All database access of the evaluation jobs."""

    def __init__(self, engine: Engine, max_run_s: float = 21600.0) -> None:
        self.engine = engine
        self.max_run_s = max_run_s
        self.ensure_schema()

    def ensure_schema(self) -> None:
        """Bring a database created before the run owner/summary columns up to date."""
        have = {c["name"] for c in inspect(self.engine).get_columns("evaluation_runs")}
        with self.engine.begin() as conn:
            for name, sql_type in (("owner", "VARCHAR(200)"), ("summary", "TEXT")):
                if name not in have:
                    conn.execute(text(f"ALTER TABLE evaluation_runs ADD COLUMN {name} {sql_type}"))
        index = next(i for i in db.evaluation_runs.indexes
                     if i.name == "uq_evaluation_runs_running")
        assert isinstance(index, Index)
        index.create(self.engine, checkfirst=True)

    # -- the guard --------------------------------------------------------------------------

    def _owner_gone(self, owner: str | None, started_at: float, now: float) -> bool:
        if not owner or owner.count(":") < 2:
            return started_at < now - self.max_run_s
        host, pid_text, token = owner.rsplit(":", 2)
        if host != socket.gethostname():
            # SQLite lives on one host: another host name is an earlier container
            return db.is_sqlite(self.engine) or started_at < now - self.max_run_s
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid == os.getpid():
            return token != _PROCESS_TOKEN
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            return False
        return False

    def recover_interrupted(self, job_name: str | None = None, now: float | None = None
                            ) -> list[int]:
        """Mark running rows whose process is gone as failed; returns their ids."""
        now = time.time() if now is None else now
        t = db.evaluation_runs
        q = (select(t.c.id, t.c.job_name, t.c.owner, t.c.started_at)
             .where(t.c.state == RunState.RUNNING))
        if job_name is not None:
            q = q.where(t.c.job_name == job_name)
        recovered = []
        with self.engine.begin() as conn:
            for r in conn.execute(q).all():
                if self._owner_gone(r.owner, r.started_at, now):
                    conn.execute(update(t).where(t.c.id == r.id,
                                                 t.c.state == RunState.RUNNING).values(
                        state=RunState.FAILED, finished_at=now,
                        error="interrupted: the process running it ended (node stopped or "
                              "crashed); see the catch-up at the next start"))
                    logger.warning("evaluation run %d of job %s was interrupted (owner gone); "
                                   "marked failed", r.id, r.job_name)
                    recovered.append(r.id)
        return recovered

    def start_run(self, job_name: str, kind: str, trigger: str,
                  scheduled_for: float | None = None, now: float | None = None) -> int:
        """Insert the running row, or raise :class:`EvaluationBusyError`."""
        now = time.time() if now is None else now
        self.recover_interrupted(job_name, now)
        t = db.evaluation_runs
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(insert(t).values(
                    job_name=job_name, kind=kind, trigger=trigger, state=RunState.RUNNING,
                    scheduled_for=scheduled_for, started_at=now, alerts=0,
                    owner=process_owner())).inserted_primary_key[0])
        except IntegrityError as exc:
            busy = self.running(job_name)
            if busy is None:  # finished in between: let the caller try again
                raise EvaluationBusyError(f"evaluation job {job_name!r} was busy; try again",
                                          -1) from exc
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(busy.started_at))
            raise EvaluationBusyError(
                f"evaluation job {job_name!r} is already running (run {busy.id}, trigger "
                f"{busy.trigger}, started {since}); not started twice", busy.id) from exc

    def running(self, job_name: str) -> RunInfo | None:
        t = db.evaluation_runs
        with db.reading(self.engine) as conn:
            r = conn.execute(select(t).where(t.c.job_name == job_name,
                                             t.c.state == RunState.RUNNING)).first()
        return RunInfo.from_row(r) if r else None

    # -- outcomes ---------------------------------------------------------------------------

    def finish_run(self, run_id: int, job_name: str, figures: Sequence[LabelFigures],
                   alerts: Sequence[Alert], models: list[dict[str, Any]], n_images: int,
                   summary: dict[str, Any], now: float | None = None) -> None:
        """Store figures and alerts and mark the run succeeded, in one transaction."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            for fig in figures:
                conn.execute(insert(db.evaluation_metrics).values(_metrics_values(run_id, fig)))
            for a in alerts:
                conn.execute(insert(db.evaluation_alerts).values(
                    run_id=run_id, job_name=job_name, model_name=a.model_name, label=a.label,
                    metric=a.metric, value=_nan_none(a.value), floor=a.floor, created_at=now))
            conn.execute(update(db.evaluation_runs).where(db.evaluation_runs.c.id == run_id)
                         .values(state=RunState.SUCCEEDED, finished_at=now, n_images=n_images,
                                 models=_json(models), summary=_json(summary),
                                 alerts=len(alerts), error=None))

    def fail_run(self, run_id: int, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(update(db.evaluation_runs).where(db.evaluation_runs.c.id == run_id)
                         .values(state=RunState.FAILED, finished_at=now,
                                 error=error[:MAX_ERROR_CHARS]))

    # -- reading ----------------------------------------------------------------------------

    def last_started(self, job_name: str) -> float | None:
        t = db.evaluation_runs
        with db.reading(self.engine) as conn:
            return conn.execute(select(t.c.started_at).where(t.c.job_name == job_name)
                                .order_by(t.c.started_at.desc()).limit(1)).scalar()

    def list_runs(self, job_name: str | None = None, state: str | None = None,
                  limit: int = 50, offset: int = 0) -> list[RunInfo]:
        t = db.evaluation_runs
        q = select(t).order_by(t.c.started_at.desc(), t.c.id.desc()).limit(limit).offset(offset)
        if job_name is not None:
            q = q.where(t.c.job_name == job_name)
        if state is not None:
            q = q.where(t.c.state == state)
        with db.reading(self.engine) as conn:
            return [RunInfo.from_row(r) for r in conn.execute(q).all()]

    def get_run(self, run_id: int) -> RunDetail | None:
        t, m = db.evaluation_runs, db.evaluation_metrics
        with db.reading(self.engine) as conn:
            r = conn.execute(select(t).where(t.c.id == run_id)).first()
            if r is None:
                return None
            rows = conn.execute(select(m).where(m.c.run_id == run_id)
                                .order_by(m.c.model_name, m.c.model_version, m.c.label)).all()
        return RunDetail(RunInfo.from_row(r), [figures_from_row(x) for x in rows],
                         self.list_alerts(run_id=run_id, open_only=False))

    def list_alerts(self, *, run_id: int | None = None, job_name: str | None = None,
                    open_only: bool = True, limit: int = 100) -> list[AlertInfo]:
        a = db.evaluation_alerts
        q = select(a).order_by(a.c.created_at.desc(), a.c.id.desc()).limit(limit)
        if run_id is not None:
            q = q.where(a.c.run_id == run_id)
        if job_name is not None:
            q = q.where(a.c.job_name == job_name)
        if open_only:
            q = q.where(a.c.acknowledged_at.is_(None))
        with db.reading(self.engine) as conn:
            return [AlertInfo(r.id, r.run_id, r.job_name, r.model_name, r.label, r.metric,
                              r.value, r.floor, r.created_at, r.acknowledged_at)
                    for r in conn.execute(q).all()]

    def acknowledge_alert(self, alert_id: int, now: float | None = None) -> bool:
        a = db.evaluation_alerts
        with self.engine.begin() as conn:
            done = conn.execute(update(a).where(a.c.id == alert_id, a.c.acknowledged_at.is_(None))
                                .values(acknowledged_at=time.time() if now is None else now))
        return done.rowcount > 0

    def latest_succeeded(self, job_name: str) -> RunDetail | None:
        t = db.evaluation_runs
        with db.reading(self.engine) as conn:
            run_id = conn.execute(select(t.c.id).where(t.c.job_name == job_name,
                                                       t.c.state == RunState.SUCCEEDED)
                                  .order_by(t.c.started_at.desc(), t.c.id.desc())
                                  .limit(1)).scalar()
        return None if run_id is None else self.get_run(run_id)

    def history(self, job_name: str, label: str | None = None, limit: int = 100
                ) -> list[tuple[RunInfo, LabelFigures]]:
        """Succeeded runs (oldest first) with their figures, for plots over time."""
        t, m = db.evaluation_runs, db.evaluation_metrics
        runs = (select(t.c.id).where(t.c.job_name == job_name, t.c.state == RunState.SUCCEEDED)
                .order_by(t.c.started_at.desc()).limit(limit).subquery())
        q = (select(m).where(m.c.run_id.in_(select(runs.c.id)))
             .order_by(m.c.run_id, m.c.model_name, m.c.label))
        if label is not None:
            q = q.where(m.c.label == label)
        with db.reading(self.engine) as conn:
            rows = conn.execute(q).all()
            ids = sorted({r.run_id for r in rows})
            infos = {r.id: RunInfo.from_row(r) for r in conn.execute(
                select(t).where(t.c.id.in_(ids))).all()} if ids else {}
        out = [(infos[r.run_id], figures_from_row(r)) for r in rows]
        out.sort(key=lambda pair: (pair[0].started_at, pair[0].id))
        return out
