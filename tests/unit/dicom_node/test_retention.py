"""Retention on a real SQLite database and real spool files: old delivered studies go
(files removed, rows kept with purged_at, audited); undelivered, uncommitted and local
results and unfinished studies stay; disk-use mode purges oldest first until below."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, insert, select

from dicom_node.config import Destination, RetentionSettings
from dicom_node.disk import DiskUsage
from dicom_node.retention import Retention
from dicom_node.spool import Spool
from dicom_node.store import db

DAY = 86400.0
NOW = 1_800_000_000.0
PLAIN = Destination(ae_title="PACS", host="127.0.0.1", port=104)
COMMITTING = Destination(ae_title="ARCHIVE", host="127.0.0.1", port=105,
                         storage_commitment=True)


@dataclass
class Study:
    uid: str
    instances: list[Path] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)  # name -> result file


class Builder:
    """Rows and files as the node writes them (ingest's spool layout, worker's outputs)."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.spool = Spool(tmp / "spool")
        self.engine: Engine = db.make_engine(db_url)
        self.n = 0

    def _uid(self) -> str:
        self.n += 1
        return f"1.2.826.0.1.3680043.10.999.{self.n}"

    def study(self, state: str, age_days: float, images: int = 2, size: int = 1000) -> Study:
        study = Study(self._uid())
        at = NOW - age_days * DAY
        with self.engine.begin() as conn:
            conn.execute(insert(db.studies).values(
                study_uid=study.uid, state=state, first_received_at=at - 60,
                last_received_at=at - 30, updated_at=at))
            job_id = conn.execute(insert(db.jobs).values(
                study_uid=study.uid, state="done", attempts=1, created_at=at)
            ).inserted_primary_key[0]
            self.job = job_id
            for _ in range(images):
                sop = self._uid()
                stored = self.spool.store(sop, [b"\0" * size], size)
                conn.execute(insert(db.instances).values(
                    sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    study_uid=study.uid, transfer_syntax="1.2.840.10008.1.2.1",
                    path=stored.relpath, size=size, sha256=stored.sha256, received_at=at,
                    analysis_state="analysed", job_id=job_id))
                study.instances.append(self.spool.path(stored.relpath))
        return study

    def output(self, study: Study, name: str, deliveries: list[dict[str, object]],
               size: int = 500) -> None:
        sop = self._uid()
        stored = self.spool.store_result(sop, b"\1" * size)
        with self.engine.begin() as conn:
            out_id = conn.execute(insert(db.outputs).values(
                job_id=self.job, kind="sr", sop_instance_uid=sop,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", series_uid=self._uid(),
                study_uid=study.uid, path=stored.relpath, created_at=NOW - DAY)
            ).inserted_primary_key[0]
            for d in deliveries:
                conn.execute(insert(db.deliveries).values(
                    output_id=out_id, attempts=1, next_attempt_at=NOW, created_at=NOW,
                    **{"destination": PLAIN.name, **d}))
        study.outputs[name] = self.spool.path(stored.relpath)

    def rows(self, table, study: Study) -> list:  # type: ignore[no-untyped-def,type-arg]
        with self.engine.connect() as conn:
            return list(conn.execute(select(table).where(table.c.study_uid == study.uid)))

    def audit(self) -> list:  # type: ignore[type-arg]
        with self.engine.connect() as conn:
            return list(conn.execute(select(db.audit_events).order_by(db.audit_events.c.id)))


@pytest.fixture
def build(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    b = Builder(tmp_path, db_url)
    yield b
    b.engine.dispose()


def retention(b: Builder, *, days: float | None = 30, disk_pct: float | None = None,
              disk=lambda: DiskUsage(100, 1, 99)) -> Retention:  # type: ignore[no-untyped-def]
    settings = RetentionSettings(max_age_days=days, max_disk_used_pct=disk_pct)
    return Retention(b.engine, b.spool, settings, [PLAIN, COMMITTING], disk)


SENT = {"state": "sent", "sent_at": NOW - DAY}


def test_old_delivered_study_is_purged_rows_kept_and_audited(build: Builder) -> None:
    old = build.study("done", age_days=40)
    build.output(old, "sr", [SENT])
    build.output(old, "sc", [SENT, {"destination": COMMITTING.name, "state": "committed",
                                    "commit_requested_at": NOW - DAY,
                                    "committed_at": NOW - DAY}])
    report = retention(build).run_once(NOW)
    assert (report.studies, report.instances, report.outputs) == (1, 2, 2)
    assert report.bytes == 2 * 1000 + 2 * 500
    assert not any(p.exists() for p in [*old.instances, *old.outputs.values()])
    assert all(r.purged_at == NOW for r in build.rows(db.instances, old))
    assert all(r.purged_at == NOW for r in build.rows(db.outputs, old))
    (event,) = build.audit()
    assert (event.kind, event.outcome, event.actor, event.subject) == (
        "retention_purged", "success", "retention", old.uid)
    assert event.detail == "older than 30 d: 2 image(s), 2 result object(s), 3000 B removed"
    assert retention(build).run_once(NOW).studies == 0  # nothing left: no second event
    assert len(build.audit()) == 1


@pytest.mark.parametrize("deliveries", [
    [{"state": "pending"}], [{"state": "sending"}], [{"state": "retrying"}],
    [{"state": "dead", "last_error": "refused"}], [{"state": "not_accepted"}],
    [SENT, {"state": "retrying", "destination": "OTHER@10.0.0.1:104"}],
    [{"destination": COMMITTING.name, **SENT}],  # commitment asked for by the config
    [{**SENT, "commit_requested_at": NOW - DAY}],  # asked, never confirmed
    [],  # a local result: no destination
], ids=["pending", "sending", "retrying", "dead", "not_accepted", "one_of_two_undelivered",
        "sent_uncommitted_by_config", "commit_unconfirmed", "local"])
def test_undelivered_or_uncommitted_results_are_kept(build: Builder, deliveries) -> None:  # type: ignore[no-untyped-def]
    study = build.study("done", age_days=40)
    build.output(study, "kept", deliveries)
    build.output(study, "delivered", [SENT])
    report = retention(build).run_once(NOW)
    assert (report.instances, report.outputs) == (2, 1)
    assert study.outputs["kept"].exists() and not study.outputs["delivered"].exists()
    assert not any(p.exists() for p in study.instances)
    kept = [r for r in build.rows(db.outputs, study) if r.purged_at is None]
    assert len(kept) == 1
    assert build.audit()[0].detail.endswith(
        "; 1 result object(s) kept (undelivered, uncommitted or local)")


@pytest.mark.parametrize("state", ["receiving", "queued", "analysing"])
def test_unfinished_studies_keep_everything(build: Builder, state: str) -> None:
    study = build.study(state, age_days=400)
    build.output(study, "sr", [SENT])
    assert retention(build, disk_pct=1).run_once(NOW).studies == 0
    assert all(p.exists() for p in [*study.instances, *study.outputs.values()])
    assert build.audit() == []


def test_young_studies_are_kept_by_age(build: Builder) -> None:
    young = build.study("failed", age_days=29)
    old = build.study("ignored", age_days=31)
    retention(build).run_once(NOW)
    assert all(p.exists() for p in young.instances)
    assert not any(p.exists() for p in old.instances)
    assert retention(build, days=None).run_once(NOW + 400 * DAY).studies == 0  # no age limit


def test_disk_mode_purges_oldest_finished_first_until_below(build: Builder) -> None:
    studies = [build.study("done", age_days=d, size=10_000) for d in (5, 1, 9, 3, 7)]
    for s in studies:
        build.output(s, "sr", [SENT], size=5_000)
    busy = build.study("analysing", age_days=20, size=10_000)
    spool_root = build.spool.root

    def usage() -> DiskUsage:  # the spool's files on a 100 kB filesystem
        used = sum(p.stat().st_size for p in spool_root.rglob("*.dcm"))
        return DiskUsage(total_bytes=100_000, used_bytes=used, free_bytes=100_000 - used)

    assert usage().used_pct == pytest.approx(145.0)  # 5 x 25 kB + 20 kB busy
    report = retention(build, days=None, disk_pct=80, disk=usage).run_once(NOW)
    # oldest first: ages 9, 7, 5 go (-75 kB), leaving 70 % <= 80 %
    gone = [s for s in studies if not any(p.exists() for p in s.instances)]
    assert gone == [studies[0], studies[2], studies[4]]
    assert report.studies == 3 and usage().used_pct == pytest.approx(70.0)
    assert all(p.exists() for p in busy.instances)
    details = [e.detail for e in build.audit()]
    assert details[0].startswith("disk 145.0 % used, above 80 %: 2 image(s), 1 result")
    assert [e.subject for e in build.audit()] == [studies[2].uid, studies[4].uid,
                                                  studies[0].uid]


def test_a_file_already_gone_is_tolerated_and_marked(build: Builder) -> None:
    study = build.study("done", age_days=40)
    study.instances[0].unlink()  # e.g. removed, then the node crashed before the commit
    report = retention(build).run_once(NOW)
    assert report.instances == 2 and report.bytes == 1000
    assert all(r.purged_at is not None for r in build.rows(db.instances, study))


def test_disabled_retention_does_nothing(build: Builder) -> None:
    study = build.study("done", age_days=400)
    settings = RetentionSettings(enabled=False, max_age_days=1, max_disk_used_pct=1)
    assert Retention(build.engine, build.spool, settings, [], lambda: DiskUsage(1, 1, 0)
                     ).run_once(time.time()).studies == 0
    assert all(p.exists() for p in study.instances)


def test_a_round_below_the_disk_limit_reads_no_candidates(build: Builder) -> None:
    """Below the limit the disk mode does not search the candidates (every finished study
    with something left: a scan of the studies, their images and results that grows with
    the database); above it, it does."""
    for d in (5, 1):
        build.output(build.study("done", age_days=d), "sr", [SENT])
    statements: list[str] = []
    event.listen(build.engine, "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: statements.append(stmt))
    below = retention(build, days=None, disk_pct=80, disk=lambda: DiskUsage(100, 50, 50))
    assert below.run_once(NOW).studies == 0
    assert not [s for s in statements if "FROM studies" in s]
    above = retention(build, days=None, disk_pct=80, disk=lambda: DiskUsage(100, 90, 10))
    assert above.run_once(NOW).studies == 2  # the usage never drops in this fake: all go
    assert [s for s in statements if "FROM studies" in s]
