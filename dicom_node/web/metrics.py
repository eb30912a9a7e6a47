"""``/metrics`` in the Prometheus text exposition format (version 0.0.4), from the DB.

Written by hand (prometheus_client is not a dependency): every family has its HELP and
TYPE lines, label values are escaped, histograms are cumulative with ``+Inf``, ``_sum``
and ``_count``. Label values are fixed categories, configuration names (job, label,
model, destination) or states; never free text, never patient data. Counters are counts
of rows, so they are as monotonic as the database is (a retention purge lowers them).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable

from flask import Blueprint, Response
from sqlalchemy import Connection, and_, func, select

from dicom_node.ood_records import withheld_counts
from dicom_node.store import db
from dicom_node.store.states import DeliveryState, InstanceState, JobState, StudyState
from dicom_node.web import evaluation_queries as eq
from dicom_node.web.context import WebContext, web_context
from dicom_node.web.health import spool_disk
from dicom_node.web.queries import DELIVERY_OPEN, count, counts_by, duration_histogram
from dicom_node.web.validation import query_params

bp = Blueprint("metrics", __name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
Sample = tuple[dict[str, str], float]

_IGNORE_CATEGORIES = (
    (r"^SOP class", "sop_class"), (r"^modality", "modality"),
    (r"^body part", "body_part"), (r"^\w+ \".*\" names non-chest anatomy", "body_part"),
    (r"^BodyPartExamined is empty", "body_part_missing"),
    (r"^secondary capture .* result page", "result_page"),
    (r"^view position", "view_position"), (r"^ViewPosition is empty", "view_position_missing"),
    (r"^colour image", "colour"), (r"^multi-frame", "multi_frame"),
    (r"^image \d+x\d+ is smaller", "too_small"), (r"^header unreadable", "header_unreadable"),
)
_QUARANTINE_CATEGORIES = (
    (r"^conflicting duplicate", "conflicting_duplicate"), (r"UID", "invalid_uid"),
    (r"^header unreadable", "header_unreadable"),
)


def category(reason: str | None, table: tuple[tuple[str, str], ...]) -> str:
    """A fixed category for a free-text reason (label values must stay bounded)."""
    for pattern, name in table:
        if reason and re.search(pattern, reason):
            return name
    return "other"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample],
               suffix: str = "") -> None:
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2)}")
        self.lines.append(f"# TYPE {name} {kind}")
        self._samples(name + suffix, samples)

    def _samples(self, name: str, samples: Iterable[Sample]) -> None:
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, help_text: str, bounds: tuple[float, ...],
                  cumulative: list[int], total: int, total_sum: float) -> None:
        self.family(name, "histogram", help_text, [])
        buckets = [({"le": repr(float(b))}, float(c)) for b, c in zip(bounds, cumulative,
                                                                   strict=True)]
        self._samples(f"{name}_bucket", [*buckets, ({"le": "+Inf"}, float(total))])
        self._samples(f"{name}_sum", [({}, total_sum)])
        self._samples(f"{name}_count", [({}, float(total))])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _categorised(rows: dict[str, int], table: tuple[tuple[str, str], ...]) -> list[Sample]:
    out: dict[str, int] = defaultdict(int)
    for reason, n in rows.items():
        out[category(reason, table)] += n
    return [({"reason": k}, float(v)) for k, v in sorted(out.items())]


def _pipeline(exp: Exposition, conn: Connection, ctx: WebContext) -> None:
    i, j, s = db.instances.c, db.jobs.c, db.studies.c
    exp.family("cxr_instances_received_total", "counter",
               "Instances acknowledged and stored (rows in the database).",
               [({}, count(conn, db.instances))])
    exp.family("cxr_instances_ignored_total", "counter",
               "Instances not analysed, by reason category.",
               _categorised(counts_by(conn, i.reason, i.analysis_state == InstanceState.IGNORED),
                            _IGNORE_CATEGORIES))
    exp.family("cxr_instances_quarantined_total", "counter",
               "Received input kept in quarantine, by reason category.",
               _categorised(counts_by(conn, db.quarantine.c.reason), _QUARANTINE_CATEGORIES))
    exp.family("cxr_instances", "gauge", "Instances by analysis state.",
               _by_state(counts_by(conn, i.analysis_state),
                         tuple(x.value for x in InstanceState)))
    exp.family("cxr_studies", "gauge", "Studies by state.",
               _by_state(counts_by(conn, s.state), tuple(x.value for x in StudyState)))
    analysed = conn.execute(select(func.count(func.distinct(j.study_uid)))
                            .where(j.state == JobState.DONE)).scalar_one()
    exp.family("cxr_studies_analysed_total", "counter",
               "Studies with at least one completed analysis job.", [({}, float(analysed))])
    jobs = counts_by(conn, j.state)
    exp.family("cxr_jobs", "gauge", "Analysis jobs by state.",
               _by_state(jobs, tuple(x.value for x in JobState)))
    exp.family("cxr_analysis_queue_depth", "gauge",
               "Analysis jobs waiting for a worker (queued) plus studies waiting for their "
               "quiet period.", [({}, float(jobs.get(JobState.QUEUED, 0))
                                  + count(conn, db.studies, s.state == StudyState.RECEIVING))])
    exp.family("cxr_jobs_failed_total", "counter",
               "Analysis jobs that failed permanently (dead letter).",
               [({}, float(jobs.get(JobState.FAILED, 0)))])
    node = ctx.node
    exp.family("cxr_model_loaded", "gauge", "1 when the model(s) are loaded.",
               [({}, 1.0 if getattr(node, "analyzer", None) is not None else 0.0)])
    exp.family("cxr_dicom_listener_up", "gauge", "1 when the DICOM listener runs.",
               [({}, 1.0 if getattr(node, "server", None) is not None else 0.0)])


def _by_state(counts: dict[str, int], states: tuple[str, ...]) -> list[Sample]:
    names = list(states) + sorted(k for k in counts if k not in states)
    return [({"state": k}, float(counts.get(k, 0))) for k in names]


def _deliveries(exp: Exposition, conn: Connection, ctx: WebContext) -> None:
    d = db.deliveries.c
    rows = conn.execute(select(d.destination, d.state, func.count())
                        .group_by(d.destination, d.state)).all()
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for dest in ctx.settings.destinations:
        for state in DeliveryState:
            counts[(dest.name, state.value)] += 0
    for dest, state, n in rows:
        counts[(dest, state)] += n
    exp.family("cxr_deliveries", "gauge",
               "Result deliveries by destination and state (retrying = waiting for the next "
               "try after a failure; not_accepted = the destination does not take the "
               "object; dead = dead letter; committed = storage commitment confirmed).",
               [({"destination": k[0], "state": k[1]}, float(v))
                for k, v in sorted(counts.items())])
    pending = count(conn, db.deliveries, d.state.in_(DELIVERY_OPEN))
    exp.family("cxr_delivery_queue_depth", "gauge",
               "Deliveries the sender still has to try (pending, sending, retrying).",
               [({}, float(pending))])


def _spool_disk(exp: Exposition, ctx: WebContext) -> None:
    """The spool filesystem (what retention and the watermarks act on)."""
    try:
        usage = spool_disk(ctx)
    except OSError:
        return  # not measurable: the families are absent rather than wrong
    for name, kind, help_text, value in (
            ("cxr_spool_disk_total_bytes", "gauge", "Size of the spool's filesystem.",
             usage.total_bytes),
            ("cxr_spool_disk_used_bytes", "gauge", "Bytes used on the spool's filesystem.",
             usage.used_bytes),
            ("cxr_spool_disk_free_bytes", "gauge",
             "Bytes still available to the node on the spool's filesystem.", usage.free_bytes),
            ("cxr_spool_disk_used_ratio", "gauge",
             "Used share of the spool's filesystem (0-1), as df counts it.", usage.used_ratio)):
        exp.family(name, kind, help_text, [({}, float(value))])


def _retention(exp: Exposition, conn: Connection) -> None:
    exp.family("cxr_retention_purged_total", "counter",
               "Spool files removed by retention (rows kept, purged_at set), by kind: received "
               "instances and result objects.",
               [({"kind": "instance"}, float(count(conn, db.instances,
                                                   db.instances.c.purged_at.is_not(None)))),
                ({"kind": "output"}, float(count(conn, db.outputs,
                                                 db.outputs.c.purged_at.is_not(None))))])


def _evaluation(exp: Exposition, conn: Connection) -> None:
    latest = eq.latest_succeeded_runs(conn)
    m = db.evaluation_metrics.c
    metrics = conn.execute(select(db.evaluation_metrics, db.evaluation_runs.c.job_name)
                           .join(db.evaluation_runs, db.evaluation_runs.c.id == m.run_id)
                           .where(m.run_id.in_([r.id for r in latest]))
                           .order_by(db.evaluation_runs.c.job_name, m.model_name, m.label)
                           ).all()
    for fig in eq.FIGURES:
        for suffix, column, what in (("", fig, "point estimate"),
                                     ("_ci_lower", f"{fig}_lo", "95% CI lower bound"),
                                     ("_ci_upper", f"{fig}_hi", "95% CI upper bound")):
            exp.family(f"cxr_evaluation_{fig}{suffix}", "gauge",
                       f"{fig} {what} per label, latest succeeded run of each job.",
                       [(_eval_labels(x), float(getattr(x, column))) for x in metrics
                        if getattr(x, column) is not None])
    exp.family("cxr_evaluation_f1", "gauge", "F1 per label, latest succeeded run of each job.",
               [(_eval_labels(x), float(x.f1)) for x in metrics if x.f1 is not None])
    r = db.evaluation_runs.c
    exp.family("cxr_evaluation_runs_total", "counter", "Evaluation runs by job and state.",
               [({"job": job, "state": state}, float(n)) for job, state, n in conn.execute(
                   select(r.job_name, r.state, func.count()).group_by(r.job_name, r.state)
                   .order_by(r.job_name, r.state)).all()])
    exp.family("cxr_evaluation_last_success_timestamp_seconds", "gauge",
               "Start time of the latest succeeded run of each job (UNIX seconds).",
               [({"job": x.job_name}, float(x.started_at)) for x in latest])
    a = db.evaluation_alerts.c
    active = conn.execute(select(a.job_name, a.model_name, a.label, a.metric, func.count())
                          .where(a.acknowledged_at.is_(None))
                          .group_by(a.job_name, a.model_name, a.label, a.metric)
                          .order_by(a.job_name, a.label, a.metric)).all()
    exp.family("cxr_evaluation_alerts_active", "gauge",
               "Unacknowledged alerts (a figure below its floor) by job, model, label, metric.",
               [({"job": x[0], "model": x[1], "label": x[2], "metric": x[3]}, float(x[4]))
                for x in active])
    exp.family("cxr_evaluation_alerts_active_count", "gauge",
               "All unacknowledged evaluation alerts.",
               [({}, float(count(conn, db.evaluation_alerts,
                                 and_(a.acknowledged_at.is_(None)))))])


def _eval_labels(x: object) -> dict[str, str]:
    return {"job": x.job_name, "model": x.model_name,  # type: ignore[attr-defined]
            "model_version": x.model_version, "label": x.label}  # type: ignore[attr-defined]


def render(ctx: WebContext) -> str:
    exp = Exposition()
    with db.reading(ctx.engine) as conn:
        _pipeline(exp, conn, ctx)
        _deliveries(exp, conn, ctx)
        cumulative, total, total_sum = duration_histogram(conn, LATENCY_BUCKETS)
        exp.histogram("cxr_inference_duration_seconds",
                      "Analysis job duration (models, Grad-CAM, outputs) of done jobs.",
                      LATENCY_BUCKETS, cumulative, total, total_sum)
        _evaluation(exp, conn)
        _retention(exp, conn)
        exp.family("cxr_ood_withheld_total", "counter",
                   "Images whose findings a model withheld as out of distribution, by model.",
                   [({"model": f"{name} {version}"}, float(n))
                    for (name, version), n in sorted(withheld_counts(conn).items())])
    _spool_disk(exp, ctx)
    return exp.text()


@bp.get("/metrics")
@query_params()
def metrics() -> Response:
    return Response(render(web_context()), content_type=CONTENT_TYPE)
