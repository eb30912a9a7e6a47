"""The node's database: SQLAlchemy Core tables and the engine.

SQLite (WAL, synchronous=FULL, one writer at a time via BEGIN IMMEDIATE; reads through
:func:`reading` begin deferred and take no lock) is the embedded default; a PostgreSQL URL
works unchanged (job and delivery claims use ``FOR UPDATE SKIP LOCKED`` there). Timestamps are UNIX seconds (float, UTC). The tables
below are today's schema; Alembic revisions (:mod:`dicom_node.store.schema`) create and
migrate it, and a test keeps the two equal on both engines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.types import TypeDecorator

from dicom_node.phi import redact
from dicom_node.store import schema
from dicom_node.store.states import InstanceState, RunState

logger = logging.getLogger(__name__)

metadata = MetaData()


class ScrubbedText(TypeDecorator[str]):
    """TEXT whose values are scrubbed of patient identifiers on the way in.

    For free text written from exception messages (job errors, reasons, delivery errors):
    whichever code writes it, a value the node has seen in a header, or one quoted the way
    pydicom quotes values, is stored as ``[redacted]`` (see :mod:`dicom_node.phi`).
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return redact(value) if isinstance(value, str) else value

UID = String(64)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=True),
    Column("transfer_syntax", UID, nullable=False),
    Column("modality", String(16), nullable=True),
    Column("path", Text, nullable=False),  # relative to the spool root
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(16), nullable=True),
    Column("received_at", Float, nullable=False),
    # pending -> selected | ignored ; analysed once the job that took it is done
    Column("analysis_state", String(16), nullable=False, default=InstanceState.PENDING),
    Column("reason", ScrubbedText, nullable=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=True),
    # retention: when the spool file was removed (the row stays as the record)
    Column("purged_at", Float, nullable=True),
    # JSON {keyword: value} of the header attributes the selection rules read, from the one
    # parse at ingest (dicom_node.dicomio.SELECTION_KEYWORDS); null in rows written before it
    # was kept or when they were not in the parsed prefix: assembly then reads the file
    Column("selection", Text, nullable=True),
    UniqueConstraint("sop_instance_uid", name="uq_instances_sop"),
)
Index("ix_instances_study", instances.c.study_uid)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", Text, nullable=True),  # may be invalid: never used as a path
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(16), nullable=True),
    Column("received_at", Float, nullable=False),
    Column("reason", ScrubbedText, nullable=False),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", UID, primary_key=True),
    # receiving -> queued -> analysing -> done | ignored | failed
    Column("state", String(16), nullable=False),
    Column("reason", ScrubbedText, nullable=True),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # start of the current receiving round (the first image, or the late image that
    # re-opened the study): studies.max_wait_s counts from here
    Column("receiving_since", Float, nullable=True),
    # when an association that delivered images of the study was released with no other
    # association of it open (dicom_node.scp): studies.release_grace_s later, the study is
    # ready unless an image arrived after it (last_received_at > released_at)
    Column("released_at", Float, nullable=True),
)
Index("ix_studies_state", studies.c.state, studies.c.last_received_at)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False),
    # queued -> running -> done | failed ; running with an expired lease is claimable again
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("error", ScrubbedText, nullable=True),
    Column("duration_s", Float, nullable=True),
    # a re-queued job waits for its backoff (None: claimable at once)
    Column("next_attempt_at", Float, nullable=True),
    # result version of the study this job produces (1, then 2 when a late image
    # supersedes the first result, ...)
    Column("version", Integer, nullable=False, default=1, server_default="1"),
    # bumped by every claim and lease renewal: a claimer takes an expired lease over only
    # after seeing the same number for lease_s of its own monotonic time (dicom_node.clock)
    Column("lease_seq", Integer, nullable=False, default=0, server_default="0"),
)
Index("ix_jobs_state", jobs.c.state, jobs.c.id)
# a study's jobs (its latest, its done versions, its active ones): a lookup, not a scan of
# the whole table or of every job in a state
Index("ix_jobs_study", jobs.c.study_uid, jobs.c.state)

findings = Table(
    "findings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    Column("label", String(64), nullable=False),
    Column("code_value", String(64), nullable=False),
    Column("code_scheme", String(16), nullable=False),
    Column("code_meaning", String(64), nullable=False),
    Column("probability", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("positive", Boolean, nullable=False),
    Column("box_x0", Float, nullable=True),
    Column("box_y0", Float, nullable=True),
    Column("box_x1", Float, nullable=True),
    Column("box_y1", Float, nullable=True),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("device_uid", UID, nullable=False),
    # the model is a DEMO bundle (never clinical); null in rows written before it was kept
    Column("model_demo", Boolean, nullable=True),
)
Index("ix_findings_job", findings.c.job_id)

# One row per (job, image, gated model): the out-of-distribution verdict (ai.types.OodVerdict).
# An out_of_distribution row means that model's findings were withheld for that image.
ood_verdicts = Table(
    "ood_verdicts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("device_uid", UID, nullable=False),
    Column("model_demo", Boolean, nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("out_of_distribution", Boolean, nullable=False),
)
Index("ix_ood_verdicts_job", ood_verdicts.c.job_id)

outputs = Table(
    "outputs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("kind", String(8), nullable=False),  # sr | sc | gsps | seg
    Column("sop_instance_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("path", Text, nullable=False),  # relative to the outputs root
    Column("created_at", Float, nullable=False),
    # a later job's outputs replace these (same series, new instances): when, and by which job
    Column("superseded_at", Float, nullable=True),
    Column("superseded_by_job", Integer, nullable=True),
    Column("purged_at", Float, nullable=True),  # retention removed the file
    UniqueConstraint("sop_instance_uid", name="uq_outputs_sop"),
)
# a study's results: the worker's earlier outputs of a study, retention's candidates, the
# dashboard's delivery summary (a scan of every result per study without it)
Index("ix_outputs_study", outputs.c.study_uid)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("output_id", Integer, ForeignKey("outputs.id"), nullable=False),
    Column("destination", String(128), nullable=False),  # AE@HOST:PORT
    # dicom_node.store.states.DeliveryState: pending -> sending -> sent | committed |
    # not_accepted | retrying | dead
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_expires_at", Float, nullable=True),
    Column("last_error", ScrubbedText, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("transfer_syntax", UID, nullable=True),  # as sent (after any transcoding)
    # storage commitment: the request's Transaction UID, when asked, when confirmed
    Column("commit_transaction_uid", UID, nullable=True),
    Column("commit_requested_at", Float, nullable=True),
    Column("committed_at", Float, nullable=True),
    # the sender process holding a ``sending`` row (dicom_node.service's node id + ":sender")
    Column("lease_owner", String(200), nullable=True),
    # bumped by every claim (see jobs.lease_seq and dicom_node.clock)
    Column("lease_seq", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("output_id", "destination", name="uq_deliveries_output_dest"),
)
Index("ix_deliveries_state", deliveries.c.state, deliveries.c.next_attempt_at)


# Security-relevant and data events (IHE ATNA in spirit): who, from where, what, outcome.
# Never patient identifiers: UIDs, internal ids, AE titles and addresses only.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),  # UNIX seconds
    # association_accepted | association_rejected | instance_received | instance_quarantined
    # | delivered | committed | not_accepted | dead_lettered | login_failed | config_loaded
    # | resubmitted | retention_purged | ...
    Column("kind", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),  # success | failure | warning
    Column("actor", String(64), nullable=True),  # calling AE, destination, "api", "node"
    Column("peer", String(64), nullable=True),  # network address[:port]
    Column("subject", String(128), nullable=True),  # a UID or internal id
    Column("detail", ScrubbedText, nullable=True),  # free text without PHI
)
Index("ix_audit_events_at", audit_events.c.at)
Index("ix_audit_events_kind", audit_events.c.kind, audit_events.c.id)

# Forwarding cursors (e.g. syslog): the last audit event id each forwarder delivered, so an
# unreachable syslog loses nothing: forwarding resumes from here.
audit_cursors = Table(
    "audit_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_id", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # ACK only after durable: fsync every commit
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# execution option of a connection that only reads (see :func:`reading`)
READ_ONLY = "cxr_read_only"


def _sqlite_begin(conn: Any) -> None:
    # a writer takes the write lock at BEGIN (IMMEDIATE): a deferred transaction that reads
    # first could not upgrade while another writer is at work; a reader (WAL) needs no lock
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: every poller, page and report that writes nothing.

    On SQLite its transaction is a deferred BEGIN, which in WAL mode takes no lock: it
    neither waits for a writer nor makes one wait (with BEGIN IMMEDIATE, a reader queued
    behind the instance rows' writer, and the other way round, through SQLite's busy handler,
    which sleeps 1, 2, 5, 10 ms and more between tries; a dashboard's counts held the lock
    for as long as they ran). The connection is read-only while lent (SQLite ``PRAGMA
    query_only``, PostgreSQL ``READ ONLY`` transactions), so a write here fails at once and
    the same way every time, not only when another writer happens to hold the lock (a
    deferred transaction cannot upgrade then). Writes go through ``engine.begin()``."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        if conn.dialect.name != "sqlite":
            conn.execution_options(postgresql_readonly=True)  # reset when returned to the pool
            yield conn
            return
        raw = conn.connection.driver_connection  # no statement yet: no transaction begun
        raw.execute("PRAGMA query_only=ON")
        try:
            yield conn
        finally:
            try:
                if conn.in_transaction():
                    conn.rollback()
                raw.execute("PRAGMA query_only=OFF")
            except Exception as exc:  # noqa: BLE001 - never back to the pool read-only
                logger.warning("read-only connection not reset (%s): discarded",
                               type(exc).__name__)
                conn.invalidate()


def make_engine(url: str) -> Engine:
    """Create the engine and bring the database's schema to this code's revision.

    ``sqlite:///<path>`` (the embedded default) or ``postgresql+psycopg://...``; see
    :mod:`dicom_node.store.schema` for the migration on start-up and when it refuses
    (:class:`dicom_node.errors.SchemaTooNewError`).
    """
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    try:
        schema.migrate(engine, metadata, upgrade_legacy=_upgrade_legacy)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _upgrade_legacy(conn: Connection) -> None:
    """A database made before the migrations: to the first revision's tables and columns
    (not today's: the later revisions then run on it as on any database at 0001)."""
    first = schema.first_revision_metadata()
    first.create_all(conn)
    add_missing_columns(conn, first)


def add_missing_columns(bind: Engine | Connection, tables: MetaData | None = None) -> list[str]:
    """Bring a database made by an earlier version up to ``tables`` (default: the current
    tables).

    ``create_all`` creates missing tables but never alters existing ones; columns added
    since (all nullable or with a server default) are added here. Returns ``table.column``
    for each column added.
    """
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return add_missing_columns(conn, tables)
    added = []
    inspector = inspect(bind)
    existing_tables = set(inspector.get_table_names())
    for table in (tables or metadata).sorted_tables:
        if table.name not in existing_tables:
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = column.type.compile(dialect=bind.dialect)
            default = (f" DEFAULT {column.server_default.arg}"
                       if column.server_default is not None else "")
            nullable = "" if column.nullable or default else " NOT NULL"
            bind.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" '
                                 f"{ddl}{default}{nullable}")
            added.append(f"{table.name}.{column.name}")
    if added:
        logger.info("database upgraded: added column(s) %s", ", ".join(added))
    return added


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# --------------------------------------------------------------------------------------------
# Evaluation (quality officers): runs of scheduled/manual evaluation jobs, their per-label
# figures, alerts when a figure falls below its floor, and ground truth confirmed later.

evaluation_runs = Table(
    "evaluation_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_name", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # reference | confirmed
    Column("trigger", String(16), nullable=False),  # schedule | manual | api | catchup
    Column("state", String(16), nullable=False),  # RunState: running | succeeded | failed
    Column("scheduled_for", Float, nullable=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("error", ScrubbedText, nullable=True),
    Column("n_images", Integer, nullable=True),
    Column("models", Text, nullable=True),  # JSON: [{name, version, device_uid, thresholds}]
    Column("alerts", Integer, nullable=False, default=0),
    Column("owner", String(200), nullable=True),  # host:pid:token of the process running it
    Column("summary", Text, nullable=True),  # JSON: images analysed, excluded by reason, ...
)
Index("ix_evaluation_runs_job", evaluation_runs.c.job_name, evaluation_runs.c.started_at)
# At most one running run per job, enforced by the database (across processes and hosts).
Index("uq_evaluation_runs_running", evaluation_runs.c.job_name, unique=True,
      sqlite_where=evaluation_runs.c.state == RunState.RUNNING.value,
      postgresql_where=evaluation_runs.c.state == RunState.RUNNING.value)

evaluation_metrics = Table(
    "evaluation_metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("evaluation_runs.id"), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("label", String(64), nullable=False),
    Column("threshold", Float, nullable=True),
    Column("n_pos", Integer, nullable=False),
    Column("n_neg", Integer, nullable=False),
    Column("tp", Integer, nullable=False),
    Column("fp", Integer, nullable=False),
    Column("tn", Integer, nullable=False),
    Column("fn", Integer, nullable=False),
    *[Column(f"{m}{suffix}", Float, nullable=True)
      for m in ("sensitivity", "specificity", "ppv", "npv", "auroc")
      for suffix in ("", "_lo", "_hi")],
    Column("f1", Float, nullable=True),
    Column("ap50", Float, nullable=True),  # detection only
    Column("froc", Text, nullable=True),  # JSON [[fp_per_image, sensitivity], ...]
    Column("roc", Text, nullable=True),  # JSON [[fpr, tpr], ...] for the plots
    # JSON Grad-CAM localisation on true positives (ai.reference.localisation): hit_rate,
    # lung_energy, tp_images, hits; null for references without locations.json
    Column("localisation", Text, nullable=True),
)
Index("ix_evaluation_metrics_run", evaluation_metrics.c.run_id)

evaluation_alerts = Table(
    "evaluation_alerts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("evaluation_runs.id"), nullable=False),
    Column("job_name", String(64), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("label", String(64), nullable=False),
    Column("metric", String(32), nullable=False),  # sensitivity | specificity
    Column("value", Float, nullable=True),
    Column("floor", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("acknowledged_at", Float, nullable=True),
)

confirmed_labels = Table(
    "confirmed_labels",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key_kind", String(8), nullable=False),  # study | sop
    Column("key_uid", UID, nullable=False),
    Column("label", String(64), nullable=False),
    Column("value", Integer, nullable=False),  # 1 present, 0 absent
    Column("source", String(16), nullable=False),  # api | csv
    Column("received_at", Float, nullable=False),
    UniqueConstraint("key_kind", "key_uid", "label", name="uq_confirmed_key_label"),
)
