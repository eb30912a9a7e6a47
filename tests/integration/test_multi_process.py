"""Scale-out on one machine: every role a real ``dicom-node serve --role`` process on one
database and one spool, exactly once through kill -9.

Two receivers on different ports, three workers, one sender and one scheduler; a real DCMTK
``storescp`` destination; ``storescu`` sends 100 studies (one of 40 images, the others of
one) split across both receivers. On PostgreSQL (a throw-away cluster, the issue's proof)
and on SQLite (several processes on one host; 30 studies). A worker holding a job and the sender in the middle of an association are killed
with kill -9 and restarted. No process but the workers loads torch. Then every acknowledged
instance was analysed by exactly one
succeeded job, each study has exactly one set of result objects, the destination holds each
of them (by SOP Instance UID) and nothing else, and no job was run by a second owner except
those the killed worker held: the others, several of which ran longer than their lease,
kept it by renewal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import ROOT, StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.dicomfiles import write_phantom_study
from helpers.node import node_settings, query, write_config
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.store import db
from dicom_node.store.states import DeliveryState, JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDIES = {"postgresql": 100, "sqlite": 30}  # the proof on PostgreSQL; SQLite: one host
LONG_STUDY = 40  # images of the first study: its job runs longer than the lease
LEASE_S = 3.0  # short, but an SQLite write lock under load can hold a renewal ~2 s
HEARTBEAT_S = 0.3


class Roles:
    """The role processes of one node layout (one log file each)."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config, self.logs = config, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, role: str, *extra: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config),
                 "--role", role, *extra], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        self.procs[name] = proc
        return proc

    def kill9(self, name: str) -> int:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return proc.pid

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _count(settings: Any, table: Any, *where: Any) -> int:
    return query(settings, select(func.count()).select_from(table).where(*where))[0][0]


def _studies(folder: Path, n: int) -> list[Path]:
    """``n`` studies, the first of ``LONG_STUDY`` larger images, the others of one small
    image: two phantoms rendered, then copied under new UIDs (the renderer is the slow
    part)."""
    small, large = (pydicom.dcmread(write_phantom_study(folder / f"base{size}", 1, seed=1,
                                                        rows=size, cols=size)[1][0])
                    for size in (128, 384))
    files = []
    for i in range(n):
        base = large if i == 0 else small
        base.StudyInstanceUID, base.SeriesInstanceUID = generate_uid(), generate_uid()
        for k in range(LONG_STUDY if i == 0 else 1):
            base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            files.append(folder / f"study{i:03d}-{k:02d}.dcm")
            base.save_as(files[-1], enforce_file_format=True)
    return files


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_roles_as_processes_analyse_and_deliver_exactly_once_through_kill9(
        tmp_path: Path, tiny_bundle: Path, db_url: str) -> None:
    engine_name = db_url.split(":", 1)[0].split("+", 1)[0]
    studies = STUDIES[engine_name]
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", quiet=5.0, destinations=[dest.destination],
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "workers.mode": "thread", "workers.count": 1,
                                "workers.torch_threads": 1, "workers.lease_s": LEASE_S,
                                "workers.heartbeat_s": HEARTBEAT_S,
                                "sender.poll_interval_s": 0.2,
                                "studies.selection.min_rows": 64,
                                "studies.selection.min_columns": 64,
                                "database.url": db_url})
    config = write_config(settings, tmp_path / "node.yaml")
    files = _studies(tmp_path / "in", studies)
    ports = [free_port(), free_port()]
    roles = Roles(config, tmp_path / "logs")
    try:
        for n, port in enumerate(ports):
            roles.spawn(f"receiver{n}", "receiver", "--port", str(port))
        for n in range(3):
            roles.spawn(f"worker{n}", "worker")
        roles.spawn("sender", "sender")
        roles.spawn("scheduler", "scheduler")
        for port in ports:
            wait_for_port(port, timeout=60)

        results: list[subprocess.CompletedProcess] = []
        halves = [files[:LONG_STUDY] + files[LONG_STUDY::2], files[LONG_STUDY + 1::2]]
        senders = [threading.Thread(target=lambda p=port, part=part: results.append(
            storescu(p, part, timeout=300))) for port, part in zip(ports, halves, strict=True)]
        for t in senders:
            t.start()

        # a worker dies holding a job, when some but not all jobs are done
        j = db.jobs.c
        victim = roles.procs["worker0"].pid
        owned = j.lease_owner.like(f"%:{victim}:%")
        wait_until(lambda: (_count(settings, db.jobs, j.state == JobState.DONE) >= 10
                            and _count(settings, db.jobs, j.state == JobState.RUNNING, owned)),
                   180, interval=0.02, what="worker0 holding a job after 10 done")
        roles.kill9("worker0")
        held = {r.id for r in query(settings, select(j.id).where(
            j.state == JobState.RUNNING, owned))}
        assert held, "the killed worker held no job"
        roles.spawn("worker0-restarted", "worker")

        # the sender dies in the middle of an association, some results delivered
        d = db.deliveries.c
        wait_until(lambda: (_count(settings, db.deliveries, d.state == DeliveryState.SENT) >= 20
                            and _count(settings, db.deliveries,
                                       d.state == DeliveryState.SENDING)),
                   180, interval=0.02, what="the sender mid-association")
        roles.kill9("sender")
        roles.spawn("sender-restarted", "sender")

        for t in senders:
            t.join(300)
        assert [r.returncode for r in results] == [0, 0], [r.stderr[-500:] for r in results]

        def settled() -> bool:
            done = _count(settings, db.jobs, j.state == JobState.DONE)
            left = _count(settings, db.deliveries, d.state != DeliveryState.SENT)
            return done == studies and left == 0 and _count(settings, db.deliveries) > 0

        wait_until(settled, 240, interval=0.5, what="every job done and every result sent")
        # receivers (and the sender, the scheduler) never load a model: no torch mapped
        for name in ("receiver0", "receiver1", "sender-restarted", "scheduler"):
            maps = Path(f"/proc/{roles.procs[name].pid}/maps").read_text()
            assert "libtorch" not in maps, f"{name} loaded torch"
        assert "libtorch" in Path(f"/proc/{roles.procs['worker1'].pid}/maps").read_text()
    finally:
        roles.stop_all()
        dest.stop()

    instances = query(settings, select(db.instances))
    jobs = query(settings, select(db.jobs))
    outputs = query(settings, select(db.outputs))
    uids_at_dest = Counter(_uid(p) for p in dest.files())

    # every acknowledged instance analysed exactly once, by one succeeded job of its study
    assert len(instances) == len(files)
    assert {r.analysis_state for r in instances} == {"analysed"}
    job_of = {r.study_uid: r.id for r in jobs}
    assert len(jobs) == len(job_of) == studies
    assert {r.state for r in jobs} == {JobState.DONE}
    # a second owner only for the jobs the killed worker held; the others kept their lease,
    # the long study's (and any other running longer than the lease) by renewal
    retried = {r.id for r in jobs if r.attempts > 1}
    assert retried <= held and max(r.attempts for r in jobs) <= 2
    longer = [r for r in jobs if (r.duration_s or 0) > LEASE_S]
    assert longer, "no job ran longer than its lease"
    # one set of result objects per study (those of its one job), none superseded
    duplicates = [r for r in outputs if r.job_id != job_of[r.study_uid]]
    assert not duplicates and {r.study_uid for r in outputs} == set(job_of)
    assert all(r.superseded_at is None for r in outputs)
    # the destination holds each result object once, nothing missing, nothing extra
    expected = {r.sop_instance_uid for r in outputs}
    missing = expected - set(uids_at_dest)
    extra = set(uids_at_dest) - expected
    assert not missing and not extra
    print(f"\nmulti-process ({engine_name}): sent {len(files)} instances in {studies} studies "
          f"over 2 receivers; acknowledged {len(instances)}; analysed {len(instances)} by "
          f"{len(jobs)} jobs, each succeeded once (3 workers, 1 killed holding {len(held)} "
          f"job(s), {len(retried)} re-run); jobs longer than the {LEASE_S:g} s lease kept by "
          f"renewal: {len(longer)} (longest {max(r.duration_s or 0 for r in jobs):.1f} s); "
          f"results {len(outputs)}, delivered {len(uids_at_dest)} distinct SOP instances; "
          f"duplicates {len(duplicates) + len(extra)}; lost {len(missing)}")
