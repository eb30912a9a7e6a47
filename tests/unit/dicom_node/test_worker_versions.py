"""Late images supersede a study's result: version 2 in the same series, new instances."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from helpers.dicomfiles import make_image
from helpers.fakes import FakeAnalyzer
from sqlalchemy import Engine, select
from test_ingest import _received

from dicom_node.config import Destination, SelectionSettings
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.studies import StudyAssembler
from dicom_node.worker import AnalysisWorker

DEST = "DEST@127.0.0.1:104"


@dataclass
class Env:
    engine: Engine
    spool: Spool
    ingestor: Ingestor
    assembler: StudyAssembler
    analyzer: FakeAnalyzer
    worker: AnalysisWorker

    def send(self, ds: pydicom.Dataset) -> None:
        assert self.ingestor.ingest(_received(ds)) == StoreStatus.SUCCESS

    def analyse_ready(self) -> None:
        """Assemble the study as soon as it is quiet and run its job."""
        assert self.assembler.run_once(now=time.time() + 60)
        outcome = self.worker.process_one("test:1:0")
        assert outcome is not None and outcome.state == "done"

    def rows(self, table):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(select(table).order_by(*table.primary_key.columns)).all()


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Env:
    engine = db.make_engine(db_url)
    spool = Spool(tmp_path / "spool")
    analyzer = FakeAnalyzer()
    worker = AnalysisWorker(engine, spool, JobQueue(engine, lease_s=60, max_attempts=2),
                            analyzer, OutputSettings(), [Destination.parse(DEST)])
    return Env(engine, spool, Ingestor(engine, spool, max_instance_bytes=50_000_000),
               StudyAssembler(engine, spool, SelectionSettings(), quiet_period_s=5,
                              max_wait_s=30), analyzer, worker)


def _by_job(outputs) -> dict[int, dict[str, list]]:  # type: ignore[no-untyped-def]
    grouped: dict[int, dict[str, list]] = {}
    for o in outputs:
        grouped.setdefault(o.job_id, {}).setdefault(o.kind, []).append(o)
    return grouped


def test_late_image_gives_version_2_in_the_same_series(
        env: Env, dciodvfy_errors: Callable[[pydicom.Dataset, str], list[str]]) -> None:
    first = [make_image(seed=i) for i in range(2)]
    study = str(first[0].StudyInstanceUID)
    for i, ds in enumerate(first):
        ds.StudyInstanceUID = study
        ds.InstanceNumber = i + 1
        env.send(ds)
    env.analyse_ready()
    late = make_image(study_uid=study, seed=7)
    env.send(late)
    assert {s.state for s in env.rows(db.studies)} == {"receiving"}  # re-opened
    env.analyse_ready()

    job1, job2 = env.rows(db.jobs)
    assert (job1.version, job2.version) == (1, 2) and job2.state == "done"
    every = sorted(str(ds.SOPInstanceUID) for ds in [*first, late])
    assert sorted(env.analyzer.calls[-1]) == every  # v2 analysed earlier and new images
    assert {i.analysis_state for i in env.rows(db.instances)} == {"analysed"}

    out = _by_job(env.rows(db.outputs))
    v1, v2 = out[job1.id], out[job2.id]
    assert {k: len(v) for k, v in v1.items()} == {"sr": 1, "sc": 2, "gsps": 1}
    assert {k: len(v) for k, v in v2.items()} == {"sr": 1, "sc": 3, "gsps": 1}
    for kind in ("sr", "sc", "gsps"):  # same series, new instances
        assert {o.series_uid for o in v1[kind]} == {o.series_uid for o in v2[kind]}
        assert len({o.series_uid for o in v2[kind]}) == 1
        assert not {o.sop_instance_uid for o in v1[kind]} & {o.sop_instance_uid
                                                             for o in v2[kind]}
    assert all(o.superseded_by_job == job2.id and o.superseded_at is not None
               for rows in v1.values() for o in rows)
    assert all(o.superseded_at is None for rows in v2.values() for o in rows)
    # both versions are delivered; the old findings stay as history
    assert len(env.rows(db.deliveries)) == 4 + 5
    assert {f.job_id for f in env.rows(db.findings)} == {job1.id, job2.id}

    [sr1], [sr2] = v1["sr"], v2["sr"]
    ds2 = pydicom.dcmread(env.spool.path(sr2.path))
    [study_item] = ds2.PredecessorDocumentsSequence
    [series_item] = study_item.ReferencedSeriesSequence
    [sop_item] = series_item.ReferencedSOPSequence
    assert study_item.StudyInstanceUID == study
    assert series_item.SeriesInstanceUID == sr1.series_uid == ds2.SeriesInstanceUID
    assert sop_item.ReferencedSOPInstanceUID == sr1.sop_instance_uid
    assert sop_item.ReferencedSOPClassUID == sr1.sop_class_uid
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(env.spool.path(sr1.path))
    assert dciodvfy_errors(ds2, "sr_v2") == []


def test_same_inputs_again_recreate_the_same_objects(env: Env) -> None:
    ds = make_image()
    env.send(ds)
    env.analyse_ready()
    before = {o.sop_instance_uid for o in env.rows(db.outputs)}
    lateral = make_image(study_uid=str(ds.StudyInstanceUID), view="LL", seed=3)
    env.send(lateral)  # re-opens the study, but adds nothing analysable
    assert env.assembler.run_once(now=time.time() + 60) == []
    assert [s.state for s in env.rows(db.studies)] == ["done"]
    # a job over the same inputs (here: forced) rebuilds the same UIDs, supersedes nothing
    with env.engine.begin() as conn:
        conn.execute(db.jobs.insert().values(study_uid=str(ds.StudyInstanceUID),
                                             state="queued", attempts=0,
                                             created_at=time.time()))
    outcome = env.worker.process_one("test:1:0")
    assert outcome is not None and outcome.state == "done"
    outs = env.rows(db.outputs)
    assert {o.sop_instance_uid for o in outs} == before
    assert all(o.superseded_at is None for o in outs)
    sr = next(o for o in outs if o.kind == "sr")
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(env.spool.path(sr.path))


def test_late_image_after_retention_purged_the_study_analyses_what_is_still_held(
        env: Env) -> None:
    """Retention removed the first images' files; a late image re-opens the study and its
    job analyses the images still on the spool instead of failing on missing files."""
    first = make_image(seed=1)
    study = str(first.StudyInstanceUID)
    env.send(first)
    env.analyse_ready()
    [inst] = env.rows(db.instances)
    env.spool.path(inst.path).unlink()  # what retention does, and records:
    with env.engine.begin() as conn:
        conn.execute(db.instances.update().values(purged_at=time.time()))
    late = make_image(study_uid=study, seed=2)
    env.send(late)
    env.analyse_ready()
    job1, job2 = env.rows(db.jobs)
    assert job2.state == "done" and job2.version == 2
    assert env.analyzer.calls[-1] == [str(late.SOPInstanceUID)]
