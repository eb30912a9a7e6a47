"""Study latency: last C-STORE-RSP of a study -> the destination's RSP for its SR/SC/GSPS.

Setup (QUALITY.md, Performance 2): an in-process :class:`dicom_node.service.Node` wired as
``dicom-node serve`` wires it (real ``load_analyzer``, one worker, CPU), a DCMTK ``storescp``
as the destination, DCMTK ``storescu`` as the PACS. One image per study, every analysable
phantom variant of ``training.synth`` at 2000 x 2500. ``studies.quiet_period_s`` = 0.5 s;
assembler, worker and sender poll every 0.1 s (the shipped defaults are 10 s / 1 s / 0.5 s
/ 0.5 s: with those, add about 10.5 s to every figure).

Every time comes from the parties themselves, so polling here costs no accuracy:

* **start**: ``instances.received_at`` of the study's last instance (the node commits it,
  then answers the C-STORE; the RSP follows within a millisecond);
* **delivered**: the latest ``deliveries.sent_at`` of the study's outputs (the node stamps it
  on the destination's C-STORE-RSP); the destination's own file times (storescp closes the
  file before it answers) are kept as a cross-check;
* the breakdown: ``jobs.created_at`` (quiet period + assembler poll), ``started_at`` (worker
  poll / queue), ``finished_at`` (analysis, outputs written), then delivery.

**Floor** per variant: a raw DCMTK forward of the same result objects (``storescu`` of the
files the destination received, to a second ``storescp``, process start included) plus the
raw model forward of one image of the same network (``torch.inference_mode``, CPU). Both
figures are measured in this run, after the node has stopped.

Model: the tests' tiny random-weight DenseNet (64 px; ``nodule`` always positive, so
Grad-CAM, boxes and the heatmap overlay are all exercised), and the bundle given with
``--bundle`` as well. Latencies at 1 study at a time (sequential) and at a steady load (a
study every ``--interval`` s for ``--duration`` s, variants in turn). One warm-up study
first (the first job pays lazy imports and first-call costs) is not counted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c

SIZE = {"rows": 2000, "columns": 2500}


@dataclass
class Study:
    variant: str
    study_uid: str
    path: Path
    phase: str
    send_s: float = 0.0
    times: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def latency(self, key: str = "delivered") -> float:
        return self.times[key] - self.times["last_rsp"]


def templates(variants: list[str]) -> dict[str, Path]:
    base = c.WORK / "latency"
    return {v: c.synth_file(base / f"template-{v}-{SIZE['rows']}x{SIZE['columns']}.dcm", v,
                            seed=100 + i, **SIZE) for i, v in enumerate(variants)}


def make_study(template: Path, variant: str, phase: str, n: int, run: str) -> Study:
    import pydicom

    out = c.WORK / "latency" / "inputs" / run / phase / f"{variant}-{n}"
    c.fresh_dir(out)
    (path,) = c.clone_instances(template, out, 1, per_study=1, tag=f"{run}-{phase}-{variant}-{n}")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return Study(variant, uid, path, phase)


def send(port: int, study: Study, called: str) -> None:
    import pydicom

    ts = str(pydicom.dcmread(study.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    study.send_s = c.send_parallel(port, [[study.path]], called=called,
                                   syntax_flag=c.syntax_flag(ts))


class Probe:
    """Reads the node's database (its own engine) to time one study."""

    def __init__(self, settings: Any) -> None:
        from dicom_node.store import db

        self.db = db
        self.engine = db.make_engine(settings.database_url)

    def close(self) -> None:
        self.engine.dispose()

    def done(self, study: Study) -> bool:
        from sqlalchemy import select

        d, o = self.db.deliveries, self.db.outputs
        with self.engine.connect() as conn:
            states = conn.execute(select(d.c.state).join(o, o.c.id == d.c.output_id)
                                  .where(o.c.study_uid == study.study_uid)).scalars().all()
            failed = conn.execute(select(self.db.jobs.c.state, self.db.jobs.c.error)
                                  .where(self.db.jobs.c.study_uid == study.study_uid)
                                  .where(self.db.jobs.c.state == "failed")).first()
        if failed is not None:
            raise RuntimeError(f"job for {study.variant} failed: {failed.error}")
        return bool(states) and all(s == "sent" for s in states)

    def collect(self, study: Study) -> None:
        from sqlalchemy import func, select

        i, j, o, d = self.db.instances, self.db.jobs, self.db.outputs, self.db.deliveries
        with self.engine.connect() as conn:
            last = conn.execute(select(func.max(i.c.received_at))
                                .where(i.c.study_uid == study.study_uid)).scalar_one()
            job = conn.execute(select(j.c.created_at, j.c.started_at, j.c.finished_at)
                               .where(j.c.study_uid == study.study_uid)).one()
            rows = conn.execute(select(o.c.sop_instance_uid, d.c.sent_at)
                                .join(d, d.c.output_id == o.c.id)
                                .where(o.c.study_uid == study.study_uid)).all()
        study.outputs = [r.sop_instance_uid for r in rows]
        study.times.update(last_rsp=last, job_created=job.created_at,
                           job_started=job.started_at, job_finished=job.finished_at,
                           delivered=max(r.sent_at for r in rows))


def wait_all(probe: Probe, studies: list[Study], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(studies)
    while pending:
        pending = [s for s in pending if not probe.done(s)]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} studies not delivered after {timeout} s")
        time.sleep(0.05)


def file_times(dest: Path) -> dict[str, tuple[float, Path]]:
    """SOP Instance UID -> (mtime, path) of what storescp wrote (``XX.<uid>`` names)."""
    out = {}
    for p in dest.iterdir():
        if p.is_file() and "." in p.name:
            out[p.name.split(".", 1)[1]] = (p.stat().st_mtime, p)
    return out


def run_node(bundle: Path, variants: list[str], tmpl: dict[str, Path], *, reps: int,
             interval: float, duration: float, quiet: float, run: str) -> tuple[list[Study], Path]:
    dest_dir = c.fresh_dir(c.WORK / "latency" / run / "dest")
    data = c.fresh_dir(c.WORK / "latency" / run / "node")
    c.configure_logging(c.VAR / "logs" / f"latency-{run}.log")
    studies: list[Study] = []
    with c.StoreSCP(dest_dir, ae_title="DEST") as dest:
        settings = c.node_settings(data, destinations=[dest.destination], quiet=quiet, **{
            "models.bundles": [str(bundle)], "models.device": "cpu", "workers.count": 1})
        node = c.start_node(settings)
        probe = Probe(settings)
        try:
            deadline = time.monotonic() + 300
            while not node.ready:
                if node.model_error or time.monotonic() > deadline:
                    raise RuntimeError(f"model did not load: {node.model_error}")
                time.sleep(0.05)
            called = settings.dicom.ae_title
            warm = make_study(tmpl[variants[0]], variants[0], "warm-up", 0, run)
            send(settings.dicom.port, warm, called)  # first job pays lazy imports: not counted
            wait_all(probe, [warm], 300)
            for n in range(reps):  # one study at a time
                for v in variants:
                    s = make_study(tmpl[v], v, "sequential", n, run)
                    send(settings.dicom.port, s, called)
                    wait_all(probe, [s], 300)
                    studies.append(s)
            steady = [make_study(tmpl[variants[k % len(variants)]], variants[k % len(variants)],
                                 "steady", k, run) for k in range(int(duration / interval))]
            start = time.monotonic()
            for k, s in enumerate(steady):  # a study every `interval` s
                time.sleep(max(0.0, start + k * interval - time.monotonic()))
                threading.Thread(target=send, args=(settings.dicom.port, s, called)).start()
            time.sleep(0.5)
            wait_all(probe, steady, 600)
            studies.extend(steady)
            for s in studies:
                probe.collect(s)
        finally:
            probe.close()
            node.stop()
    files = file_times(dest_dir)
    for s in studies:
        s.times["dest_file"] = max(files[u][0] for u in s.outputs)
    return studies, dest_dir


def forward_s(bundle: Path, repeats: int = 20) -> float:
    import torch

    from ai.bundle.load import load_bundle

    loaded = load_bundle(bundle, device=torch.device("cpu"))
    size = loaded.metadata.input.size
    x = torch.rand(1, 1, size, size)
    with torch.inference_mode():
        for _ in range(3):
            loaded.model(x)
        return c.median(c.best_of(lambda: loaded.model(x), repeats))


def raw_forward_s(files: list[Path], repeats: int = 5) -> float:
    """storescu -> storescp of the given result files (one association), median seconds."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(c.syntax_flag(ts), []).append(f)
    out = c.WORK / "latency" / "floor-dest"
    times = []
    for _ in range(repeats):
        c.fresh_dir(out)
        with c.StoreSCP(out, ae_title="FLOOR") as scp:
            t = time.perf_counter()
            for flag, group in groups.items():
                subprocess.run(c.storescu_cmd(scp.port, group, called="FLOOR", syntax_flag=flag),
                               check=True, capture_output=True, env=c.DCMTK_ENV)
            times.append(time.perf_counter() - t)
    return c.median(times)


def sender_nagle(sample: Path, count: int = 20) -> dict[str, float]:
    """ms per C-STORE of a small result object, pynetdicom (as the node's sender) -> storescp.

    pynetdicom leaves Nagle's algorithm on; a small object then waits for the destination's
    delayed ACK. The same association with TCP_NODELAY shows what that costs per object.
    """
    import socket

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    sop = pydicom.dcmread(sample, stop_before_pixels=True).SOPClassUID
    out: dict[str, float] = {}
    for nodelay in (False, True):
        with c.StoreSCP(c.fresh_dir(c.WORK / "latency" / "nagle-dest"), ae_title="NAGLE") as scp:
            ae = AE("CXR_AI")
            ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="NAGLE")
            if nodelay:
                assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(count):
                t = time.perf_counter()
                assoc.send_c_store(str(sample))
                times.append(1000 * (time.perf_counter() - t))
            assoc.release()
        out["nodelay_ms" if nodelay else "default_ms"] = c.median(times)
    return out


def report(name: str, studies: list[Study], variants: list[str], floors: dict[str, float],
           fwd: float, quiet: float) -> list[dict[str, Any]]:
    rows, out = [], []
    for v in variants:
        seq = [s for s in studies if s.variant == v and s.phase == "sequential"]
        lat = [s.latency() for s in seq]
        p50, p95 = c.percentile(lat, 50), c.percentile(lat, 95)
        floor = floors[v] + fwd
        wait = c.median([s.times["job_started"] - s.times["last_rsp"] - quiet for s in seq])
        analysis = c.median([s.times["job_finished"] - s.times["job_started"] for s in seq])
        deliver = c.median([s.times["delivered"] - s.times["job_finished"] for s in seq])
        rec = {"variant": v, "n": len(lat), "p50_s": p50, "p95_s": p95,
               "p50_excl_quiet_s": p50 - quiet, "p95_excl_quiet_s": p95 - quiet,
               "wait_s": wait, "analysis_s": analysis, "delivery_s": deliver, "floor_s": floor,
               "floor_send_s": floors[v], "floor_forward_s": fwd,
               "dest_file_p50_s": c.percentile([s.latency("dest_file") for s in seq], 50)}
        out.append(rec)
        rows.append((v, len(lat), p50, p95, p50 - quiet, p95 - quiet, wait, analysis, deliver,
                     1000 * floor, f"{(p50 - quiet) / floor:.1f}x"))
    c.table(["variant", "n", "p50 s", "p95 s", "p50 excl quiet", "p95 excl quiet",
             "polls s", "analysis s", "delivery s", "floor ms", "p50 excl quiet / floor"], rows,
            title=f"\n{name}: one study at a time (latency = last C-STORE-RSP -> destination "
                  f"RSP of the last result; quiet period {quiet} s; polls = assembler + worker "
                  "poll lag; analysis = job run incl. result writes; delivery = job end -> "
                  "last RSP; medians)")
    steady = [s for s in studies if s.phase == "steady"]
    if steady:
        lat = [s.latency() for s in steady]
        queue = [s.times["job_started"] - s.times["job_created"] for s in steady]
        floor = c.median([floors[s.variant] for s in steady]) + fwd
        rec = {"variant": "steady (all)", "n": len(lat), "p50_s": c.percentile(lat, 50),
               "p95_s": c.percentile(lat, 95), "queue_p50_s": c.percentile(queue, 50),
               "queue_p95_s": c.percentile(queue, 95), "floor_s": floor}
        out.append(rec)
        c.table(["load", "n", "p50 s", "p95 s", "p50 excl quiet", "p95 excl quiet",
                 "queue wait p95 s", "floor ms", "p50 excl quiet / floor"],
                [("steady", len(lat), rec["p50_s"], rec["p95_s"], rec["p50_s"] - quiet,
                  rec["p95_s"] - quiet, rec["queue_p95_s"], 1000 * floor,
                  f"{(rec['p50_s'] - quiet) / floor:.1f}x")])
    return out


def main(argv: list[str] | None = None) -> int:
    from training.synth import ANALYSABLE_VARIANTS

    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--bundle", type=Path, help="also measure this (real) model bundle")
    p.add_argument("--reps", type=int, help="sequential studies per variant (default 5, quick 2)")
    p.add_argument("--interval", type=float, default=2.0, help="steady load: s between studies")
    p.add_argument("--duration", type=float, help="steady load: seconds (default 60, quick 20)")
    p.add_argument("--quiet", type=float, default=0.5, help="studies.quiet_period_s")
    p.add_argument("--variants", nargs="*", default=list(ANALYSABLE_VARIANTS))
    c.torch_threads(p)
    args = p.parse_args(argv)
    c.set_torch_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    duration = args.duration or (20.0 if args.quick else 60.0)
    tmpl = templates(args.variants)
    bundles = {"tiny random DenseNet (64 px)":
               c.make_random_bundle(c.WORK / "bundles" / "tiny-densenet-64")}
    if args.bundle:
        bundles[f"bundle {args.bundle.name}"] = args.bundle
    results: dict[str, Any] = {"quick": args.quick, "quiet_period_s": args.quiet,
                               "interval_s": args.interval, "duration_s": duration,
                               "size": SIZE, "models": {}}
    for k, (name, bundle) in enumerate(bundles.items()):
        run = f"run{k}"
        studies, dest = run_node(bundle, args.variants, tmpl, reps=reps, interval=args.interval,
                                 duration=duration, quiet=args.quiet, run=run)
        files = file_times(dest)
        floors = {}
        for v in args.variants:
            first = next(s for s in studies if s.variant == v)
            floors[v] = raw_forward_s([files[u][1] for u in first.outputs])
        fwd = forward_s(bundle)
        sizes = {v: sum(files[u][1].stat().st_size for u in next(
            s for s in studies if s.variant == v).outputs) for v in args.variants}
        rows = report(name, studies, args.variants, floors, fwd, args.quiet)
        print(f"floor = raw storescu -> storescp of the study's results (SR + SC + GSPS, "
              f"{min(sizes.values()) / 1e6:.1f}-{max(sizes.values()) / 1e6:.1f} MB, process "
              f"start included) + raw forward {1000 * fwd:.1f} ms; {os.cpu_count()} CPU cores")
        sr = next(files[u][1] for u in studies[0].outputs if files[u][1].name.startswith("SR"))
        nagle = sender_nagle(sr)
        print(f"sender: one SR ({sr.stat().st_size / 1e3:.0f} kB) pynetdicom -> storescp "
              f"{nagle['default_ms']:.1f} ms per C-STORE as the node sends (Nagle on), "
              f"{nagle['nodelay_ms']:.1f} ms with TCP_NODELAY")
        results["models"][name] = {
            "bundle": c.rel(bundle), "rows": rows, "forward_s": fwd, "result_bytes": sizes,
            "sender_c_store_ms": nagle,
            "studies": [{"variant": s.variant, "phase": s.phase, "send_s": s.send_s,
                         **s.times} for s in studies]}
        for d in (c.WORK / "latency" / run, c.WORK / "latency" / "inputs" / run):
            shutil.rmtree(d, ignore_errors=True)  # about 1 GB per run; templates stay
    c.write_results("latency", results, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
