"""Analysis workers as OS processes (``workers.mode: process``): a real node receives over
``storescu``, a worker process of its own analyses and the results reach a real
``storescp``; a worker killed with kill -9 is restarted and its job re-run, delivered once;
``Node.stop`` leaves no worker process behind, and a node killed with kill -9 takes its
worker process with it. (``test_node_log`` runs the same layout with the quick demo bundles
through ``dicom-node serve``.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.dicomfiles import write_phantom_study
from helpers.node import node_settings, query, spawn_node, start_node, write_config
from sqlalchemy import select

from dicom_node.analysis import load_analyzer
from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study(folder: Path, n: int, *, seed: int, rows: int, cols: int, variant: str
           ) -> tuple[str, list[Path]]:
    return write_phantom_study(folder, n, seed=seed, rows=rows, cols=cols, variant=variant,
                               seed_step=100)


def _spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (the worker processes;
    not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for a reaper that is not us."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _jobs(settings, study: str) -> list:  # type: ignore[no-untyped-def]
    return query(settings, select(db.jobs).where(db.jobs.c.study_uid == study))


def _sent(settings, study: str) -> bool:  # type: ignore[no-untyped-def]
    rows = query(settings, select(db.deliveries.c.state).join(
        db.outputs, db.outputs.c.id == db.deliveries.c.output_id).where(
        db.outputs.c.study_uid == study))
    return bool(rows) and all(r.state == "sent" for r in rows)


def test_worker_process_analyses_survives_kill9_and_stops_with_the_node(
        tmp_path: Path, tiny_bundle: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", quiet=0.3, destinations=[dest.destination],
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "workers.mode": "process", "workers.lease_s": 600,
                                "workers.restart_backoff_s": 0.2, "web.enabled": True,
                                "web.port": free_port()})
    node = start_node(settings, load_analyzer)
    seen: set[int] = set()
    try:
        assert node.workers is not None
        wait_until(lambda: node.ready, 120, what="models loaded by the worker process")
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web.port}/readyz",
                                    timeout=10) as resp:
            assert json.load(resp)["checks"]["model"] == "loaded"
        assert [m.name for m in node.analyzer.models] == ["tiny-test-classifier"]
        [pid] = node.workers.pids()
        seen.add(pid)
        assert pid != os.getpid() and pid in _spawned_children(os.getpid())
        # its OpenMP pool bounded as torch's; OpenJPEG decodes on every core (no spinning)
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ")
                       .read_text().split("\0") if "=" in item)
        assert {k: environ.get(k) for k in ("OMP_NUM_THREADS", "OPJ_NUM_THREADS")} == {
            "OMP_NUM_THREADS": str(settings.workers.torch_thread_count),
            "OPJ_NUM_THREADS": str(os.cpu_count())}
        assert "OPJ_NUM_THREADS" not in os.environ  # the node's own environment is restored
        assert not [t for t in threading.enumerate() if t.name.startswith("worker-")
                    and t.name != "worker-pool"]  # no analysis thread in the node itself

        second, files = _study(tmp_path / "s2", 2, seed=2, rows=1600, cols=1400,
                               variant="dx_mono1_j2k")
        assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: [j.state for j in _jobs(settings, second)] == ["running"], 60,
                   interval=0.01, what="second study's job running")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: node.workers.restarts == 1 and len(node.workers.pids()) == 1
                   and node.workers.pids()[0] != pid, 60, what="worker process restarted")
        seen.update(node.workers.pids())
        wait_until(lambda: _sent(settings, second), 180, what="second study delivered")
        [job] = _jobs(settings, second)
        assert (job.state, job.attempts) == ("done", 2)  # re-run once, by the new process
        outputs = query(settings, select(db.outputs).where(db.outputs.c.study_uid == second))
        assert sorted(o.kind for o in outputs) == ["gsps", "sc", "sc", "sr"]
        deliveries = query(settings, select(db.deliveries).where(
            db.deliveries.c.output_id.in_([o.id for o in outputs])))
        assert len(deliveries) == len(outputs)  # one delivery per object: delivered once
        received = [pydicom.dcmread(f, stop_before_pixels=True) for f in dest.files()]
        mine = [str(ds.SOPInstanceUID) for ds in received
                if str(ds.StudyInstanceUID) == second]
        assert sorted(mine) == sorted(o.sop_instance_uid for o in outputs)
    finally:
        node.stop()
        dest.stop()
    assert all(_gone(pid) for pid in seen)
    assert _spawned_children(os.getpid()) == []  # Node.stop leaves no worker process


def test_a_node_killed_with_kill9_takes_its_worker_process_with_it(
        tmp_path: Path, tiny_bundle: Path) -> None:
    settings = node_settings(tmp_path / "node", **{
        "models.bundles": [str(tiny_bundle)], "models.device": "cpu",
        "workers.mode": "process"})
    proc = spawn_node(write_config(settings, tmp_path / "node.yaml"), tmp_path / "node.log")
    try:
        wait_for_port(settings.dicom.port, timeout=60)
        wait_until(lambda: len(_spawned_children(proc.pid)) == 1, 60,
                   what="worker process started")
        [child] = _spawned_children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: _gone(child), 10, interval=0.05, what="orphan worker exited")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_bundle_that_cannot_load_is_reported_and_not_restarted_in_a_loop(
        tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    (broken / "configs" / "metadata.json").write_text("{not json", encoding="utf-8")
    settings = node_settings(tmp_path / "node", **{
        "models.bundles": [str(broken)], "models.device": "cpu", "workers.mode": "process",
        "workers.restart_backoff_s": 0.1})
    node = start_node(settings, load_analyzer)
    try:
        wait_until(lambda: node.model_error is not None, 60, what="load failure reported")
        assert "broken" in node.model_error or "metadata" in node.model_error
        wait_until(lambda: not node.workers.pids(), 10, what="worker process exited")
        assert not node.ready and node.workers.restarts == 0
    finally:
        node.stop()


def test_wakeups_cross_the_process_boundary(tmp_path: Path, tiny_bundle: Path) -> None:
    """Shipped completion settings with every poll at 30 s: only the wake-ups (release ->
    assembler -> the worker process through the pool's shared event -> the parent's sender
    through the child's report) can bring the result to the destination within 8 s, under
    the 10 s quiet period."""
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", quiet=10.0, destinations=[dest.destination],
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "workers.mode": "process", "studies.poll_interval_s": 30,
                                "workers.poll_interval_s": 30, "sender.poll_interval_s": 30})
    node = start_node(settings, load_analyzer)
    try:
        assert node.workers is not None
        wait_until(lambda: node.ready, 120, what="models loaded by the worker process")
        study, files = _study(tmp_path / "s", 1, seed=5, rows=512, cols=512,
                          variant="dx_mono2_explicit")
        # the child's first idle wait started at its load: wait past nothing, send now
        assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: _sent(settings, study), 8, what="results delivered by wake-ups")
        [job] = _jobs(settings, study)
        assert job.state == "done"
    finally:
        node.stop()
        dest.stop()
