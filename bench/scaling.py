"""Scale-out of analysis: studies/s with 1, 2 and 3 worker processes, and the ratio to 1.

Layout (issue 13): one ``dicom-node serve --role receiver`` process and N ``dicom-node
serve --role worker`` processes (one worker thread and one torch thread each, the node's
own code) on one SQLite database and spool. Once every worker has loaded its model, the
same one-image studies are sent over one association (``storescu``); its release makes them
all ready together and the workers claim and analyse them. Throughput is studies / (last
job finished - first job started), from the node's own ``jobs`` rows. No destination: delivery is the
sender's role and is not measured here.

Model: a random-weight DenseNet121 at 224 px (the demo classifier's size; weights are
irrelevant to cost) with Grad-CAM, on 512 x 512 phantoms; ``--quick`` uses the tests' tiny
DenseNet at 64 px and fewer studies. On a machine with C cores the ideal ratio is
min(N, C); other work on the machine lowers it (``busy_warning``).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

WORKERS = (1, 2, 3)


def _spawn(config: Path, log: Path, role: str, *extra: str) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config), "--role",
             role, *extra], cwd=c.ROOT, stdout=fh, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(c.ROOT), "OMP_NUM_THREADS": "1"})


def _jobs(db: Path) -> list[tuple[str, float | None, float | None]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute("SELECT state, started_at, finished_at FROM jobs").fetchall()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(workers: int, files: list[Path], bundle: Path, work: Path) -> dict[str, Any]:
    import yaml

    data = c.fresh_dir(work / f"workers-{workers}")
    settings = c.node_settings(data, quiet=0.5, **{
        "models.bundles": [str(bundle)], "models.device": "cpu", "workers.mode": "thread",
        "workers.count": 1, "workers.torch_threads": 1, "storage.retention.enabled": False})
    config = data / "node.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    port, db = c.free_port(), data / "node.db"
    logs = [data / f"worker{n}.log" for n in range(workers)]
    procs = [_spawn(config, data / "receiver.log", "receiver", "--port", str(port)),
             *(_spawn(config, log, "worker") for log in logs)]
    try:
        c.wait_for_port(port, timeout=120)
        _wait(lambda: all(log.exists() and "models loaded" in log.read_text()
                          for log in logs), 600, "every worker's model")
        # one association: its release (+ studies.release_grace_s) makes every study
        # ready at once, so all workers start together on a full queue
        subprocess.run(c.storescu_cmd(port, files, called=settings.dicom.ae_title),
                       check=True, capture_output=True, timeout=600)
        _wait(lambda: len(_jobs(db)) == len(files)
              and all(r[0] == "done" for r in _jobs(db)), 1800, "every job done")
    finally:
        _stop(procs)
    rows = _jobs(db)
    span = max(r[2] or 0 for r in rows) - min(r[1] or 0 for r in rows)
    return {"workers": workers, "studies": len(rows), "span_s": span,
            "studies_per_s": len(rows) / span}


def main() -> None:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--studies", type=int, help="one-image studies per run (default 48, "
                   "quick 16)")
    args = p.parse_args()
    busy = c.busy_warning()
    work = c.WORK / "scaling"
    studies = args.studies or (16 if args.quick else 48)
    network, size = ("densenet", 64) if args.quick else ("densenet121", 224)
    bundle = c.make_random_bundle(work / f"bundle-{network}-{size}", network=network,
                                  size=size)
    template = c.synth_file(work / "template-512.dcm", "dx_mono2_explicit", seed=13,
                            rows=512, columns=512)
    files = c.clone_instances(template, c.fresh_dir(work / "inputs"), studies, per_study=1,
                              tag="scaling")
    rows = [measure(n, files, bundle, work) for n in WORKERS]
    base = rows[0]["studies_per_s"]
    for r in rows:
        r["ratio_vs_1"] = r["studies_per_s"] / base
    c.table(["worker processes", "studies", "span s", "studies/s", "ratio vs 1"],
            [[r["workers"], r["studies"], round(r["span_s"], 2), round(r["studies_per_s"], 2),
              round(r["ratio_vs_1"], 2)] for r in rows],
            title=f"Analysis scale-out: {network} {size} px + Grad-CAM, 512x512 one-image "
                  f"studies, {os.cpu_count()} CPUs")
    c.write_results("scaling", {"machine_busy": busy, "network": f"{network}-{size}",
                                "rows": rows}, enabled=not args.no_json)


if __name__ == "__main__":
    main()
