"""The benchmarks' own arithmetic and harness (bench/ is scripts, not a package).

Performance itself is never asserted here (QUALITY.md: benchmarks print ratios, tests count):
these tests pin what the figures are computed with -- a p95 printed with its sample count, the
efficiency ratio, the queue-growth verdict, the summary's target rows -- and that the harness
measures a real node: ``dicom-node serve`` in its own process, a real pynetdicom destination,
a real association. ``bench/gpu.sh`` is checked where no GPU is: its syntax, its refusal
without CUDA, and a dry-run cell on CPU.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def bench(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


# ------------------------------------------------------------------------------- arithmetic


def test_percentile_matches_numpy_linear_interpolation() -> None:
    import numpy as np

    st = bench("_stats")
    values = [0.3, 5.0, 1.2, 9.9, 2.2, 7.1, 0.4]
    for q in (0, 50, 90, 95, 100):
        assert st.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert st.percentile([], 95) != st.percentile([], 95)  # NaN


def test_p95_label_prints_the_real_sample_count_and_marks_quick_runs() -> None:
    st = bench("_stats")
    assert st.p95_label([1.0, 2.0]) == f"{st.percentile([1.0, 2.0], 95):.2f} s (n=2, quick)"
    thirty = [float(i) for i in range(30)]
    assert st.p95_label(thirty) == f"{st.percentile(thirty, 95):.2f} s (n=30)"
    assert st.p95_label([]) == "- (n=0)"


def test_efficiency_is_end_to_end_rate_over_forward_rate() -> None:
    st = bench("_stats")
    # the figures: 1.38 img/s end to end vs 12.8 img/s forward at batch 1 -> 0.107
    assert st.efficiency(1, 1 / 1.38, 1 / 12.8) == pytest.approx(1.38 / 12.8)
    assert st.efficiency(8, 4.0, 1.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        st.efficiency(1, 0.0, 1.0)


def test_queue_growth_is_a_climb_of_more_than_one_interval() -> None:
    st = bench("_stats")
    assert not st.queue_grew([2.5, 2.7, 2.4, 2.6, 2.8, 2.5], 2.0)
    # service 2.7 s at one arrival every 2 s: each study waits 0.7 s longer than the last
    assert st.queue_grew([2.7 + 0.7 * k for k in range(9)], 2.0)
    assert not st.queue_grew([1.0, 50.0], 2.0)  # too few to tell


def test_summary_rows_hold_each_target_against_its_measurement() -> None:
    run_all = bench("run_all")
    lat = {"rows": [
        {"mode": "shipped", "syntax": "JPEG 2000", "p95_s": 4.0, "target_s": 3.0,
         "latencies_s": [4.0] * 30},
        {"mode": "no-wait", "syntax": "RLE", "p95_s": 1.0, "target_s": 3.0,
         "latencies_s": [1.0, 1.0]},
        {"mode": "shipped", "syntax": "steady, one study every 2 s", "p95_s": 2.0,
         "target_s": 3.0, "queue_grew": False, "ok": True, "latencies_s": [2.0] * 8},
        {"mode": "shipped", "syntax": "first study after start, RLE", "n": 1,
         "latency_s": 2.25, "next_p50_s": 1.5, "analysis_s": 1.1, "target_s": 3.0,
         "ok": True}],
        "machine_busy": {"start": None, "end": None}}
    rows = run_all.summarise("latency", lat)
    assert [r.status for r in rows] == ["MISSED", "-", "ok", "-"]
    assert "n=30" in rows[0].measured and "n=2, quick" in rows[1].measured
    assert "stable" in rows[2].measured
    assert rows[3].measured == "2.25 s (the next ones p50 1.50 s)"  # one sample: context
    pipe = {"pipeline": [{"network": "DenseNet121 224 px", "input": "JPEG 2000", "batch": 1,
                          "n": 5, "ratio": 0.3, "end_to_end_images_per_s": 3.0,
                          "forward_images_per_s": 10.0}],
            "gradcam": [{"network": "x", "batch": 1, "overhead": {"ai.gradcam": 1.05}}],
            "machine_busy": {"start": "WARNING: busy", "end": None}}
    rows = run_all.summarise("pipeline", pipe)
    assert [(r.target, r.status) for r in rows] == [(">= 0.6", "MISSED"), ("<= 1.2x", "ok"),
                                                    ("-", "-")]
    # decode: the node's decoder at the largest size, the chosen JPEG 2000 level only
    case = {"size": "3000x2500", "codec": "JPEG 2000", "median_ms": 200.0,
            "ratio_vs_uncompressed": 50.0}
    dec = {"cases": [case | {"size": "2048x2048", "decoder": "node: pylibjpeg", "node": True},
                     case | {"decoder": "pylibjpeg", "node": False},
                     case | {"decoder": "node reduce=2: pillow", "node": True},
                     case | {"decoder": "node reduce=1: pillow *", "node": True}],
           "machine_busy": "WARNING: the machine is busy"}
    rows = run_all.summarise("decode", dec)
    assert [r.name for r in rows] == ["decode 3000x2500 px JPEG 2000 (node reduce=1: pillow *)",
                                      "decode: machine busy"]
    # ingest: each cell against storescp, and the worker-busy cell against the idle one
    cell = {"corpus": "large", "instances": 8, "parallel": 1}
    ing = {"cells": [cell | {"worker": "idle", "ratio": 0.9, "node": {"instances_per_s": 10.0}},
                     cell | {"worker": "busy", "ratio": 0.7, "node": {"instances_per_s": 8.0}}]}
    rows = run_all.summarise("ingest", ing)
    assert [(r.name[-11:], r.status) for r in rows] == [
        ("worker idle", "ok"), ("worker busy", "MISSED"), ("busy / idle", "MISSED")]
    # a renamed field gives a row that says so, not a crash of the whole summary
    (broken,) = run_all.summarise("ingest", {"cells": [{"corpus": "small"}]})
    assert "summary needs field" in broken.measured


# ---------------------------------------------------------------------------------- harness


def test_node_overrides_become_the_nodes_environment_variables() -> None:
    n = bench("_node")
    env = n.env_for({"studies.quiet_period_s": 0, "models.bundles": ["/b/one"],
                     "web.enabled": False})
    assert env == {"CXR_NODE__STUDIES__QUIET_PERIOD_S": "0",
                   "CXR_NODE__MODELS__BUNDLES": "[/b/one]",
                   "CXR_NODE__WEB__ENABLED": "false"}
    assert n.settings_has("studies.quiet_period_s")
    assert not n.settings_has("studies.no_such_key")


def test_tree_rss_counts_the_children_of_a_process(tmp_path: Path) -> None:
    n = bench("_node")
    code = "import time; b = bytearray(64 * 2**20); open(%r, 'w').close(); time.sleep(30)"
    flag = tmp_path / "allocated"
    child = subprocess.Popen([sys.executable, "-c", code % str(flag)])
    try:
        deadline = time.monotonic() + 20
        while not flag.exists():
            assert time.monotonic() < deadline, "the child never allocated"
            time.sleep(0.05)
        alone = n.tree_rss(child.pid)
        assert alone > 64 * 2**20  # the child's own 64 MiB
        assert n.tree_rss(os.getpid()) > alone  # this process plus that child
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(shutil.which("storescp") is None and not Path("/usr/sbin/storescp").exists(),
                    reason="DCMTK is not installed")
def test_latency_harness_times_a_real_node_process(tmp_path: Path) -> None:
    """One phantom study through ``dicom-node serve`` (tiny random model) to the stamping
    destination: results arrive, the latency is positive, the job breakdown is read."""
    import pydicom

    c, n, lat = bench("_common"), bench("_node"), bench("latency")
    bundle = c.make_random_bundle(tmp_path / "bundle")
    tmpl = c.synth_file(tmp_path / "t.dcm", "dx_mono2_rle", seed=3, rows=320, columns=256)
    (path,) = c.clone_instances(tmpl, tmp_path / "in", 1, per_study=1, tag="test")
    study: Any = lat.Study("RLE", "test", "sequential",
                           str(pydicom.dcmread(path).StudyInstanceUID), path)
    dest = n.Destination(tmp_path / "dest")
    try:
        overrides = {"models.bundles": [str(bundle)], "studies.quiet_period_s": 0,
                     "models.device": "cpu"}
        with n.NodeProcess(tmp_path / "node", destination=dest.destination,
                           overrides=overrides, log=tmp_path / "node.log") as node:
            assert node.wait_models(120) >= 0  # its log says so (after the warm-up)
            probe = lat.Probe(node.database_url)
            try:
                study.rsp = n.store(node.port, [path], n.settings_value("dicom.ae_title"))
                lat.wait_all(probe, [study], 120)
                probe.collect(study)
            finally:
                probe.close()
    finally:
        dest.stop()
    received = dest.received[study.uid]
    assert len(received) >= 2  # SR and SC at least (GSPS when a box was found)
    study.times["dest"] = dest.last(study.uid)
    assert 0 < study.latency() < 120
    assert study.times["jobs"] == 1
    assert study.times["job_started"] <= study.times["job_finished"] <= study.times["dest"]


# -------------------------------------------------------------------------------------- GPU


def test_gpu_script_parses_and_refuses_clearly_without_cuda() -> None:
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    gpu = bench("gpu")
    args = gpu.parse(["--dry-run"])
    assert (args.batches, args.iters, args.warmup) == ([1, 2], 1, 0)
    assert gpu.parse(["--batches", "1", "8", "32"]).batches == [1, 8, 32]
    with pytest.raises(SystemExit):
        gpu.parse(["--batches", "0"])
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    proc = subprocess.run([str(BENCH / "gpu.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr


def test_gpu_dry_run_cell_runs_inference_and_a_training_step_on_cpu() -> None:
    import torch
    from monai.networks.nets import DenseNet

    gpu = bench("gpu")
    model = DenseNet(spatial_dims=2, in_channels=1, out_channels=5, init_features=8,
                     growth_rate=4, block_config=(1, 1, 1, 1))
    r = gpu.cell(model, "classification", 32, 2, "amp+channels_last", torch.device("cpu"),
                 iters=1, warmup=0)
    assert r["inference_images_per_s"] > 0 and r["training_images_per_s"] > 0


def test_latency_floor_is_nan_without_dcmtk_or_with_no_floor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A bare GPU machine has no DCMTK: the floor's send part is NaN with the reason printed,
    instead of a SystemExit that would throw away the latencies measured before it."""
    lat = bench("latency")
    tmpl = {"uncompressed": tmp_path / "a.dcm", "RLE": tmp_path / "b.dcm"}
    monkeypatch.setenv("PATH", str(tmp_path))  # neither storescu nor storescp on it
    floors = lat.send_floors(tmpl, [], None, skip=False)
    assert list(floors) == list(tmpl) and all(v != v for v in floors.values())  # NaN
    assert "storescu and storescp not installed" in capsys.readouterr().out
    monkeypatch.undo()
    floors = lat.send_floors(tmpl, [], None, skip=True)
    assert all(v != v for v in floors.values())
    assert "--no-floor" in capsys.readouterr().out


def test_wait_models_says_at_once_when_the_node_cannot_load_them(tmp_path: Path) -> None:
    """A bundle folder that is not a bundle: the node keeps receiving and logs why it has no
    models; the benchmark stops waiting with that instead of running out its timeout."""
    n = bench("_node")
    broken = tmp_path / "not-a-bundle"
    (broken / "configs").mkdir(parents=True)
    with n.NodeProcess(tmp_path / "node", destination=None, log=tmp_path / "node.log",
                       overrides={"models.bundles": [str(broken)], "models.device": "cpu"}
                       ) as node:
        with pytest.raises(RuntimeError, match="could not load its models"):
            node.wait_models(120)
        assert node.proc.poll() is None  # still up, receiving


def test_readers_grown_database_links_every_row_to_its_study(tmp_path: Path) -> None:
    """``bench/readers.py`` grows a database as a node that ran for a while has it: each
    finished study with 2 images and a done job, an SR, SC and GSPS sent once, two audit
    events; the rows of one study point at each other across the insert batches; the files of
    studies older than the shipped retention's 30 days are marked purged."""
    from sqlalchemy import func, select

    from dicom_node.store import db

    readers = bench("readers")
    url = f"sqlite:///{tmp_path / 'node.db'}"
    readers.grow(url, 30, batch=7)
    readers.grow(url, 5, batch=7)  # a second call appends: ids continue
    engine = db.make_engine(url)
    try:
        with db.reading(engine) as conn:
            def n(stmt: Any) -> int:
                return int(conn.execute(stmt).scalar_one())

            counts = {t.name: n(select(func.count()).select_from(t)) for t in (
                db.studies, db.instances, db.jobs, db.outputs, db.deliveries, db.audit_events)}
            i, j, o, d = db.instances.c, db.jobs.c, db.outputs.c, db.deliveries.c
            linked_images = n(select(func.count()).select_from(
                db.instances.join(db.jobs, j.id == i.job_id)).where(j.study_uid == i.study_uid))
            linked_results = n(select(func.count()).select_from(
                db.deliveries.join(db.outputs, o.id == d.output_id)
                .join(db.jobs, j.id == o.job_id)).where(j.study_uid == o.study_uid))
            done = n(select(func.count()).select_from(db.studies)
                     .where(db.studies.c.state == "done"))
            # received over a year; the files of those older than 30 days purged (30 studies:
            # 0, 12 and 24 days old kept; 5: only the newest)
            kept = (n(select(func.count()).select_from(db.instances).where(i.purged_at.is_(None))),
                    n(select(func.count()).select_from(db.outputs).where(o.purged_at.is_(None))))
    finally:
        engine.dispose()
    assert counts == {"studies": 35, "instances": 70, "jobs": 35, "outputs": 105,
                      "deliveries": 105, "audit_events": 70}
    assert (linked_images, linked_results, done) == (70, 105, 35)
    assert kept == (2 * 4, 3 * 4)
