"""Study completion by association release (issue 11): a study is ready a short grace after
the association that delivered it is released, not after the quiet period; overlapping
associations and aborts fall back to the quiet period. The result path is driven by
wake-ups, not polls. Real sockets (DCMTK storescu / pynetdicom SCU), a real SQLite file, a
real storescp destination; every wait is on a condition with a bound."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.counting import record_begins
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node, studies
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.store import db

pytestmark = [pytest.mark.integration]

# the quiet period these tests run with (the shipped default): every bound below is under it,
# so a study that is ready within the bound was not waiting for it
QUIET_S = 10.0
BOUND_S = 8.0


def _jobs(settings) -> list:  # type: ignore[no-untyped-def]
    return query(settings, select(db.jobs))


def _ready_lines(caplog: pytest.LogCaptureFixture, study: str) -> list[str]:
    return [m for m in caplog.messages if m.startswith(f"study {study} ready")]


def test_default_settings_deliver_after_the_release_without_waiting_for_quiet_or_polls(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The guard: shipped completion settings (quiet period 10 s, release grace 1 s); the
    polls set to 30 s so only the wake-ups (release -> assembler -> worker -> sender) can
    bring the result to the destination within the bound."""
    caplog.set_level(logging.INFO)
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=QUIET_S,
                             **{"studies.poll_interval_s": 30, "workers.poll_interval_s": 30,
                                "sender.poll_interval_s": 30})
    assert settings.studies.release_grace_s == 1.0  # the default, not set here
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        wait_until(lambda: node.analyzer is not None, 30, what="model loaded")
        ds = make_image(seed=1)
        study = str(ds.StudyInstanceUID)
        res = storescu(settings.dicom.port, [write(ds, tmp_path / "in")])
        assert res.returncode == 0, res.stderr
        wait_until(lambda: len(dest.files()) >= 3, BOUND_S, what="results at the destination")
        assert _ready_lines(caplog, study) == [
            f"study {study} ready (released): job {_jobs(settings)[0].id} with 1 image(s), "
            "0 ignored"]
        assert studies(settings)[study].released_at is not None
    finally:
        node.stop()
        dest.stop()


def _associate(port: int) -> object:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(make_image().SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
    assert assoc.is_established
    return assoc


def test_overlapping_associations_complete_the_study_at_the_last_release(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path / "node", quiet=QUIET_S)
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        first = make_image(seed=1)
        study = str(first.StudyInstanceUID)
        a, b = _associate(settings.dicom.port), _associate(settings.dicom.port)
        assert a.send_c_store(first).Status == 0x0000  # type: ignore[attr-defined]
        assert b.send_c_store(  # type: ignore[attr-defined]
            make_image(study_uid=study, seed=2)).Status == 0x0000
        a.release()  # type: ignore[attr-defined]
        # the node logs what an association brought when it closes, after its release
        wait_until(lambda: sum(m.startswith("received 1 image(s) of study") for m in
                               caplog.messages) == 1, BOUND_S, what="first association closed")
        row = studies(settings)[study]
        assert row.state == "receiving" and row.released_at is None and _jobs(settings) == []

        b.release()  # type: ignore[attr-defined]
        wait_until(lambda: _jobs(settings), BOUND_S, what="a job after the second release")
        [job] = _jobs(settings)
        assert _ready_lines(caplog, study) == [
            f"study {study} ready (released): job {job.id} with 2 image(s), 0 ignored"]
    finally:
        node.stop()


def test_aborted_association_falls_back_to_the_quiet_period(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path / "node", quiet=1.0)
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        ds = make_image(seed=3)
        study = str(ds.StudyInstanceUID)
        res = storescu(settings.dicom.port, [write(ds, tmp_path / "in")], extra=["--abort"])
        assert res.returncode == 0, res.stderr
        wait_until(lambda: _jobs(settings), 30, what="a job after the quiet period")
        [job] = _jobs(settings)
        assert _ready_lines(caplog, study) == [
            f"study {study} ready (quiet): job {job.id} with 1 image(s), 0 ignored"]
        assert studies(settings)[study].released_at is None
    finally:
        node.stop()


def test_late_image_after_a_released_result_supersedes_it_at_its_own_release(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path / "node", quiet=QUIET_S)
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        first = make_image(seed=4)
        study = str(first.StudyInstanceUID)
        assert storescu(settings.dicom.port, [write(first, tmp_path / "in")]).returncode == 0
        wait_until(lambda: studies(settings)[study].state == "done", BOUND_S, what="v1")
        late = make_image(study_uid=study, seed=5)
        assert storescu(settings.dicom.port, [write(late, tmp_path / "in")]).returncode == 0
        wait_until(lambda: [j.state for j in _jobs(settings)] == ["done", "done"], BOUND_S,
                   what="v2 after the late image's own release")
        jobs = query(settings, select(db.jobs).order_by(db.jobs.c.id))
        assert [j.version for j in jobs] == [1, 2]
        assert [m.split(":")[0] for m in _ready_lines(caplog, study)] == [
            f"study {study} ready (released)"] * 2
        outs = query(settings, select(db.outputs))
        assert {o.superseded_by_job for o in outs if o.job_id == jobs[0].id} == {jobs[1].id}
    finally:
        node.stop()


def test_the_nodes_assembler_writes_through_the_ingest_writer(tmp_path: Path) -> None:
    """The node as `serve` wires it, real storescu associations: every study's job is written
    by the ingest's group commit, the assembler's own thread only reads (deferred BEGIN on
    SQLite), so it never queues for the database's write lock against the instance rows."""
    settings = node_settings(tmp_path / "node", quiet=QUIET_S)
    node = start_node(settings, lambda s: FakeAnalyzer())
    begins, _ = record_begins(node.engine)
    try:
        assert node.assembler.writer is node.ingestor.writer  # SQLite: the embedded default
        for seed in range(3):
            res = storescu(settings.dicom.port, [write(make_image(seed=seed), tmp_path / "in")])
            assert res.returncode == 0, res.stderr
        wait_until(lambda: len(_jobs(settings)) == 3, BOUND_S, what="three studies assembled")
    finally:
        node.stop()
    assembler = [read_only for name, read_only in begins if name == "assembler"]
    assert assembler and all(assembler), begins
    assert any(name == "ingest-writer" and not read_only for name, read_only in begins)
