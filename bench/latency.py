"""Study latency: last C-STORE-RSP of a one-image study -> the destination's RSP for its last
result, with the shipped demo pair, every transfer syntax the node decodes, 3000 x 2500.

Why this set-up (issue 11, "Honest benchmarks"): what a radiologist waits for is the time from
the modality's last image to the result in the viewer, with the model the node ships and the
configuration it ships. So:

* **The node** is ``dicom-node serve --config config/node.yaml`` in its own process, as
  ``make run`` starts it (:class:`_node.NodeProcess`): embedded defaults plus the data folder,
  port, destination and the demo bundle folder. ``models.bundles`` stays empty, so the node
  loads the shipped DEMO PAIR (classifier + detector), built once the way the node builds it
  (``dicom_node.analysis.ensure_demo_bundle``; full build cached under
  ``var/bench/work/demo-full``, ``--quick`` uses the seconds-long quick build, labelled).
* **Two modes**: ``shipped`` (the configuration as is, completion wait included) and
  ``no-wait`` (``studies.quiet_period_s`` 0 and, where main has it, ``studies.release_grace_s``
  0): the difference is what the completion rule costs.
* **Clocks**: the PACS is pynetdicom in this process (:func:`_node.store`, wall time of its
  last C-STORE-RSP); the destination is a pynetdicom Storage SCP here that stamps each C-STORE
  just before it answers. Latency = last destination stamp of the study - last RSP. The
  node's database only says when a study is complete (every delivery ``sent``) and gives the
  breakdown (job created / started / finished).
* **Samples**: p95 over >= 30 one-at-a-time studies per (mode, syntax) cell with ``--full``;
  quick runs take fewer and every p95 prints its ``n``. Then a **steady rate** in the
  shipped mode: one study every ``--interval`` s for ``--steady`` studies, syntaxes in turn;
  reported: p95 and whether the queue grew (last third vs first third).
* **The first study after a start**: once the node logs its models loaded, one study of
  the first syntax, reported apart (n = 1 per mode, next to the p50 of the ones after it):
  what a radiologist meets after every restart, first-use costs included (the worker's
  warm-up, ``workers.warm_up``, is there to remove them).
* **Floor** per syntax: raw ``storescu`` -> ``storescp`` of the same result files (process
  start included) + raw forward of both demo networks (batch 1, this process, after the node
  stopped).
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
import _node as n
import _stats as st

SIZE = {"rows": 3000, "columns": 2500}
# transfer syntax -> the phantom variant of training.synth that is written in it
SYNTAXES = {
    "uncompressed": "dx_mono2_explicit",
    "RLE": "dx_mono2_rle",
    "JPEG Lossless": "cr_mono1_jpeg_lossless",
    "JPEG-LS": "cr_mono2_jpegls",
    "JPEG 2000": "dx_mono1_j2k",
}
TARGET_CPU_S, TARGET_GPU_S = 3.0, 1.0


@dataclass
class Study:
    syntax: str
    mode: str
    phase: str  # "first" (after a start), "sequential" or "steady"
    uid: str
    path: Path
    rsp: float = 0.0
    times: dict[str, float] = field(default_factory=dict)

    def latency(self) -> float:
        return self.times["dest"] - self.rsp


def demo_bundles(quick: bool) -> tuple[Path, dict[str, Any]]:
    """The demo pair, built once under var/bench/work the way the node builds it."""
    from dicom_node.analysis import ensure_demo_bundle
    from dicom_node.config import load_settings

    build = "quick" if quick else "full"
    overrides = {"models.demo_dir": str(c.WORK / f"demo-{build}"), "models.demo_build": build,
                 "storage.data_dir": str(c.WORK / "demo-settings")}
    settings = load_settings(None, overrides=overrides, environ={})
    t = time.perf_counter()
    found = ensure_demo_bundle(settings)
    print(f"demo pair ({build} build): {', '.join(p.name for p in found)} "
          f"({time.perf_counter() - t:.0f} s, cached under {c.rel(settings.demo_bundle_dir)})")
    return settings.demo_bundle_dir, {"models.demo_dir": str(settings.demo_bundle_dir),
                                      "models.demo_build": build}


def templates(size: dict[str, int]) -> dict[str, Path]:
    base = c.WORK / "latency"
    return {s: c.synth_file(base / f"template-{v}-{size['rows']}x{size['columns']}.dcm", v,
                            seed=100 + i, **size) for i, (s, v) in enumerate(SYNTAXES.items())}


def make_study(template: Path, syntax: str, mode: str, phase: str, k: int) -> Study:
    import pydicom

    out = c.fresh_dir(c.WORK / "latency" / "inputs" / mode / phase / f"{syntax}-{k}")
    (path,) = c.clone_instances(template, out, 1, per_study=1, tag=f"{mode}-{phase}-{syntax}-{k}")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return Study(syntax, mode, phase, uid, path)


class Probe:
    """Reads the node's database: is a study delivered, and when did its job run."""

    def __init__(self, url: str) -> None:
        from dicom_node.store import db

        self.db, self.engine = db, db.make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def done(self, study: Study) -> bool:
        from sqlalchemy import select

        d, o, j = self.db.deliveries, self.db.outputs, self.db.jobs
        with self.engine.connect() as conn:
            states = conn.execute(select(d.c.state).join(o, o.c.id == d.c.output_id)
                                  .where(o.c.study_uid == study.uid)).scalars().all()
            failed = conn.execute(select(j.c.error).where(j.c.study_uid == study.uid)
                                  .where(j.c.state == "failed")).first()
        if failed is not None:
            raise RuntimeError(f"the job of a {study.syntax} study failed: {failed.error}")
        return bool(states) and all(s == "sent" for s in states)

    def collect(self, study: Study) -> None:
        from sqlalchemy import select

        j = self.db.jobs
        with self.engine.connect() as conn:
            jobs = conn.execute(select(j.c.created_at, j.c.started_at, j.c.finished_at)
                                .where(j.c.study_uid == study.uid).order_by(j.c.id)).all()
        if jobs:  # a late image re-opens a study: its last job made the delivered result
            study.times.update(job_created=jobs[-1].created_at, job_started=jobs[-1].started_at,
                               job_finished=jobs[-1].finished_at, jobs=len(jobs))


def wait_all(probe: Probe, studies: list[Study], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(studies)
    while pending:
        pending = [s for s in pending if not probe.done(s)]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} studies not delivered after {timeout} s")
        time.sleep(0.05)


def mode_overrides(mode: str) -> dict[str, Any]:
    if mode == "shipped":
        return {}
    out: dict[str, Any] = {"studies.quiet_period_s": 0}
    if n.settings_has("studies.release_grace_s"):
        out["studies.release_grace_s"] = 0
    return out


def run_mode(mode: str, tmpl: dict[str, Path], models: dict[str, Any], dest: n.Destination,
             *, reps: int, steady: int, interval: float, keep: bool) -> list[Study]:
    """One node in ``mode``: a warm-up, ``reps`` studies per syntax one at a time, then the
    steady-rate run (``steady`` studies, 0 for none)."""
    data = c.fresh_dir(c.WORK / "latency" / mode / "node")
    overrides = {**models, **mode_overrides(mode)}
    studies: list[Study] = []
    with n.NodeProcess(data, destination=dest.destination, overrides=overrides,
                       log=c.VAR / "logs" / f"latency-{mode}.log") as node:
        probe = Probe(node.database_url)
        called = n.settings_value("dicom.ae_title")
        try:
            syntaxes = list(tmpl)
            node.wait_models(900)
            # the first study once the models are loaded: what a radiologist meets after
            # every restart of the node (reported apart; first-use costs show here)
            first = make_study(tmpl[syntaxes[0]], syntaxes[0], mode, "first", 0)
            first.rsp = n.store(node.port, [first.path], called)
            wait_all(probe, [first], 900)
            studies.append(first)
            for k in range(reps):
                for s in syntaxes:
                    study = make_study(tmpl[s], s, mode, "sequential", k)
                    if keep and k == 0:
                        dest.keep.add(study.uid)
                    study.rsp = n.store(node.port, [study.path], called)
                    wait_all(probe, [study], 600)
                    studies.append(study)
                print(f"  {mode}: round {k + 1}/{reps} done", flush=True)
            studies += steady_run(node, probe, tmpl, mode, steady, interval, called)
            for study in studies:
                probe.collect(study)
                study.times.update(last_rsp=study.rsp, dest=dest.last(study.uid))
        finally:
            probe.close()
    shutil.rmtree(c.WORK / "latency" / "inputs" / mode, ignore_errors=True)
    return studies


def steady_run(node: n.NodeProcess, probe: Probe, tmpl: dict[str, Path], mode: str,
               count: int, interval: float, called: str) -> list[Study]:
    syntaxes = list(tmpl)
    studies = [make_study(tmpl[syntaxes[k % len(syntaxes)]], syntaxes[k % len(syntaxes)], mode,
                          "steady", k) for k in range(count)]
    errors: list[BaseException] = []

    def send(study: Study) -> None:
        try:
            study.rsp = n.store(node.port, [study.path], called)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = []
    start = time.monotonic()
    for k, study in enumerate(studies):
        time.sleep(max(0.0, start + k * interval - time.monotonic()))
        threads.append(threading.Thread(target=send, args=(study,)))
        threads[-1].start()
    for t in threads:
        t.join(120)
    if errors:
        raise RuntimeError(f"steady run: a send failed: {errors[0]}")
    wait_all(probe, studies, 60 + 30 * count)
    return studies


def forward_s(bundle_root: Path, repeats: int = 10) -> float:
    """Raw forward of every demo network at batch 1 (summed), best of ``repeats`` seconds, on
    the device the node's ``models.device: auto`` picks (CUDA when present), so the floor is
    the one the node could reach on this machine."""
    import torch

    from ai.bundle.load import load_bundle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total = 0.0
    for d in sorted(p for p in bundle_root.iterdir() if (p / "configs").is_dir()):
        loaded = load_bundle(d, device=device)
        size = loaded.metadata.input.size
        x = torch.rand(1, 1, size, size, device=device)

        def once(m: Any = loaded.model, x: Any = x) -> None:
            m(x)
            sync()

        with torch.inference_mode():
            for _ in range(2):
                once()
            total += min(c.best_of(once, repeats))
    return total


def floor_send_s(files: list[Path], repeats: int = 3) -> float:
    """storescu -> storescp of the given result files (one association per syntax), median."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(c.syntax_flag(ts), []).append(f)
    out, times = c.WORK / "latency" / "floor-dest", []
    for _ in range(repeats):
        c.fresh_dir(out)
        with c.StoreSCP(out, ae_title="FLOOR", extra=["+xa"]) as scp:  # compressed SCs too
            t = time.perf_counter()
            for flag, group in groups.items():
                subprocess.run(c.storescu_cmd(scp.port, group, called="FLOOR", syntax_flag=flag),
                               check=True, capture_output=True, env=c.DCMTK_ENV)
            times.append(time.perf_counter() - t)
    return c.median(times)


def send_floors(tmpl: dict[str, Path], studies: list[Study], dest: n.Destination, *,
                skip: bool) -> dict[str, float]:
    """The DCMTK part of each syntax's floor; NaN (and a line saying why) where it cannot be
    measured: ``--no-floor``, no ``storescu``/``storescp`` on this machine (a bare GPU box), or
    a peer that fails, so the latencies measured before are never lost to the floor."""
    nan = float("nan")
    missing = [t for t in ("storescu", "storescp") if shutil.which(t) is None
               and not Path(f"/usr/sbin/{t}").exists()]
    if skip or missing:
        why = "--no-floor" if skip else f"{' and '.join(missing)} not installed (DCMTK)"
        print(f"floor: DCMTK send part not measured ({why}); the floor column is NaN")
        return {syntax: nan for syntax in tmpl}
    floors = {}
    for syntax in tmpl:
        first = next(s for s in studies if s.syntax == syntax and s.uid in dest.keep)
        files = [dest.files[sop] for sop, _ in dest.received[first.uid]]
        try:
            floors[syntax] = floor_send_s(files)
        except subprocess.CalledProcessError as exc:  # keep the measured latencies
            print(f"floor for {syntax} not measured: storescu -> storescp failed: "
                  f"{exc.stderr.decode(errors='replace')[-300:]}")
            floors[syntax] = nan
        except (OSError, TimeoutError) as exc:  # storescp did not start or listen
            print(f"floor for {syntax} not measured: {type(exc).__name__}: {exc}")
            floors[syntax] = nan
    return floors


def breakdown(studies: list[Study], key_from: str, key_to: str) -> float:
    values = [s.times[key_to] - s.times[key_from] for s in studies
              if s.times.get(key_to) is not None and s.times.get(key_from) is not None]
    return c.median(values)


def report(studies: list[Study], floors: dict[str, float], fwd: float, interval: float,
           target: float) -> list[dict[str, Any]]:
    rows, out = [], []
    for mode in dict.fromkeys(s.mode for s in studies):
        for syntax in SYNTAXES:
            seq = [s for s in studies if s.mode == mode and s.syntax == syntax
                   and s.phase == "sequential"]
            lat = [s.latency() for s in seq]
            if not lat:
                continue
            rec = {"mode": mode, "syntax": syntax, "n": len(lat),
                   "p50_s": st.percentile(lat, 50), "p95_s": st.percentile(lat, 95),
                   "target_s": target, "ok": st.percentile(lat, 95) <= target,
                   "wait_s": breakdown(seq, "last_rsp", "job_started"),
                   "analysis_s": breakdown(seq, "job_started", "job_finished"),
                   "delivery_s": breakdown(seq, "job_finished", "dest"),
                   "floor_s": floors.get(syntax, float("nan")) + fwd, "latencies_s": lat}
            out.append(rec)
            rows.append((mode, syntax, rec["p50_s"], st.p95_label(lat), rec["wait_s"],
                         rec["analysis_s"], rec["delivery_s"], 1000 * rec["floor_s"],
                         "ok" if rec["ok"] else "MISSED"))
    c.table(["mode", "syntax", "p50 s", "p95", "wait s", "analysis s", "delivery s",
             "floor ms", f"p95 <= {target:g} s"], rows,
            title="\nlatency, one study at a time (last C-STORE-RSP -> destination RSP of the "
                  "last result; wait = until the job starts: completion rule + polls; "
                  "analysis = job incl. result writes; delivery = job end -> destination; "
                  "medians)")
    firsts = [s for s in studies if s.phase == "first"]
    first_rows = []
    for s in firsts:
        later = [x.latency() for x in studies if x.mode == s.mode and x.syntax == s.syntax
                 and x.phase == "sequential"]
        rec = {"mode": s.mode, "syntax": f"first study after start, {s.syntax}", "n": 1,
               "latency_s": s.latency(), "next_p50_s": st.percentile(later, 50),
               "analysis_s": s.times["job_finished"] - s.times["job_started"],
               "target_s": target, "ok": s.latency() <= target}
        out.append(rec)
        first_rows.append((s.mode, s.syntax, rec["latency_s"], rec["analysis_s"],
                           rec["next_p50_s"], "ok" if rec["ok"] else "MISSED"))
    if first_rows:
        c.table(["mode", "syntax", "latency s", "analysis s", "next ones p50 s",
                 f"<= {target:g} s"], first_rows,
                title="\nthe first study once the node's models are loaded (after a start)")
    steady = [s for s in studies if s.phase == "steady"]
    if steady:
        lat = [s.latency() for s in sorted(steady, key=lambda s: s.rsp)]
        grew = st.queue_grew(lat, interval)
        rec = {"mode": steady[0].mode, "syntax": f"steady, one study every {interval:g} s",
               "n": len(lat), "p50_s": st.percentile(lat, 50), "p95_s": st.percentile(lat, 95),
               "target_s": target, "queue_grew": grew,
               "ok": (not grew) and st.percentile(lat, 95) <= target, "latencies_s": lat}
        out.append(rec)
        c.table(["mode", "load", "p50 s", "p95", "first / last latency s", "queue"],
                [(rec["mode"], rec["syntax"], rec["p50_s"], st.p95_label(lat),
                  f"{lat[0]:.1f} / {lat[-1]:.1f}", "GREW" if grew else "stable")],
                title="\nlatency at a steady rate")
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, help="studies per (mode, syntax) (full 30, quick 1)")
    p.add_argument("--steady", type=int, help="studies of the steady run (full 30, quick 6)")
    p.add_argument("--interval", type=float, default=2.0, help="steady run: s between studies")
    p.add_argument("--modes", nargs="*", default=["shipped", "no-wait"],
                   choices=["shipped", "no-wait"])
    p.add_argument("--syntaxes", nargs="*", default=list(SYNTAXES), choices=list(SYNTAXES))
    p.add_argument("--rows", type=int, default=SIZE["rows"])
    p.add_argument("--columns", type=int, default=SIZE["columns"])
    p.add_argument("--no-floor", action="store_true",
                   help="skip the storescu -> storescp part of the floor (no DCMTK here)")
    args = p.parse_args(argv)
    quick = args.quick
    busy = {"start": c.busy_warning()}
    reps = args.reps or (1 if quick else st.FULL_SAMPLES)
    steady = args.steady if args.steady is not None else (6 if quick else st.FULL_SAMPLES)
    root, models = demo_bundles(quick)
    size = {"rows": args.rows, "columns": args.columns}
    tmpl = {s: p for s, p in templates(size).items() if s in args.syntaxes}
    target = TARGET_GPU_S if torch.cuda.is_available() else TARGET_CPU_S
    dest = n.Destination(c.fresh_dir(c.WORK / "latency" / "dest"))
    studies: list[Study] = []
    try:
        for k, mode in enumerate(args.modes):
            print(f"\nmode {mode}: {reps} studies per syntax one at a time"
                  + (f", then {steady} at one every {args.interval:g} s" if k == 0 else ""),
                  flush=True)
            studies += run_mode(mode, tmpl, models, dest, reps=reps,
                                steady=steady if k == 0 else 0, interval=args.interval,
                                keep=k == len(args.modes) - 1)
    finally:
        dest.stop()
    floors = send_floors(tmpl, studies, dest, skip=args.no_floor)
    fwd = forward_s(root)
    rows = report(studies, floors, fwd, args.interval, target)
    print(f"floor = raw storescu -> storescp of the study's result files + raw forward of the "
          f"demo pair {1000 * fwd:.0f} ms; {os.cpu_count()} CPUs; "
          f"{'QUICK: demo quick build, few samples' if quick else 'full'}")
    busy["end"] = c.busy_warning()
    c.write_results("latency", {
        "quick": quick, "machine_busy": busy, "size": size, "reps": reps,
        "interval_s": args.interval, "demo_build": models["models.demo_build"],
        "overrides": {m: mode_overrides(m) for m in args.modes}, "forward_s": fwd,
        "floor_send_s": floors, "rows": rows,
        "studies": [{"syntax": s.syntax, "mode": s.mode, "phase": s.phase, "rsp": s.rsp,
                     **s.times} for s in studies]}, not args.no_json)
    shutil.rmtree(c.WORK / "latency" / "dest", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
