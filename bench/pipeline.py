"""Pipeline efficiency (the real node's job, compressed input, both demo bundles) and Grad-CAM
overhead, each against the raw model forward of the same network, batch and device.

**Pipeline** (issue 11; QUALITY.md, Performance 3): end-to-end images/s of what a job of the
real node does -- read its spool files, decode, preprocess, forward, Grad-CAM, boxes, SR/SC/GSPS
building and encoding, result files written with fsync, the database rows -- divided by the raw
forward images/s of the same network(s), batch and device (``torch.inference_mode`` on random
tensors, in this process after the node stopped). The node is ``dicom-node serve`` as ``make
run`` starts it (:class:`_node.NodeProcess`, a 1 s quiet period so a study is one job);
a job's time is its ``jobs.started_at`` -> ``jobs.finished_at`` in the node's own database
(stamped at the claim, and inside the commit's transaction after every result file is
fsynced: only that final commit's own fsync is outside).

Rows: the shipped DEMO PAIR (classifier + detector: the raw forward is both networks' summed)
and a random-weight DenseNet121 at 224 px (efficiency is about overhead, not weights); input
JPEG Lossless and JPEG 2000 phantoms at 3000 x 2500; batch 1 (one-image studies, one at a
time) and the worker's batch (one study of that many images: one job, one ``analyze`` call).

**Grad-CAM** (QUALITY.md, Performance 4): (forward + CAM of one class) / forward, for
``ai.gradcam.GradCAM`` (gradient only from the score down to the target layer, on the
frozen bundle model as the node runs it) and for ``monai.visualize.GradCAM`` (a full
backward: the same weights with ``requires_grad`` on, as a network built in MONAI has them;
and with frozen weights and an input that requires grad, the cheapest full backward).
Same target layer, batch and device; median of the repeats. Target: at most 1.2x.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import Any

import _common as c
import _node as n
import _stats as st
from latency import Probe, Study, demo_bundles, wait_all

INPUTS = {"JPEG Lossless": "cr_mono1_jpeg_lossless", "JPEG 2000": "dx_mono1_j2k"}
SIZE = {"rows": 3000, "columns": 2500}
TARGET_EFFICIENCY, TARGET_GRADCAM = 0.6, 1.2


def worker_batch() -> int:
    """The batch the node's worker analyses at: its configuration, else the Analyzer's 8."""
    for key in ("models.batch_size", "workers.batch_size"):
        if n.settings_has(key) and n.settings_value(key):
            return int(n.settings_value(key))
    return 8


def study_files(syntax: str, size: dict[str, int], images: int, k: int) -> list[Path]:
    variant = INPUTS[syntax]
    base = c.WORK / "pipeline"
    tmpl = c.synth_file(base / f"template-{variant}-{size['rows']}x{size['columns']}.dcm",
                        variant, seed=11, **size)
    out = c.fresh_dir(base / "inputs" / f"{variant}-{images}-{k}")
    return c.clone_instances(tmpl, out, images, per_study=images, tag=f"pipeline-{images}-{k}")


def job_times(node: n.NodeProcess, probe: Probe, files: list[Path]) -> float:
    """Send one study, wait for its delivery; its job's started -> finished seconds."""
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    study = Study("", "", "", uid, files[0])
    n.store(node.port, files, n.settings_value("dicom.ae_title"))
    wait_all(probe, [study], 900)
    probe.collect(study)
    if study.times.get("jobs") != 1:
        raise RuntimeError(f"a study of {len(files)} images was analysed in "
                           f"{study.times.get('jobs')} jobs: the pipeline row needs one")
    return study.times["job_finished"] - study.times["job_started"]


def run_node(name: str, overrides: dict[str, Any], size: dict[str, int], inputs: list[str],
             batches: list[int], repeats: int) -> dict[tuple[str, int], list[float]]:
    """Job seconds per (input syntax, batch) for one model set, in one node process."""
    data = c.fresh_dir(c.WORK / "pipeline" / "node")
    # a short completion wait: a study's images all arrive before its one job is made
    values = {**overrides, "studies.quiet_period_s": 1.0}
    out: dict[tuple[str, int], list[float]] = {}
    dest = n.Destination(c.fresh_dir(c.WORK / "pipeline" / "dest"))
    try:
        with n.NodeProcess(data, destination=dest.destination, overrides=values,
                           log=c.VAR / "logs" / "pipeline.log") as node:
            probe = Probe(node.database_url)
            try:
                job_times(node, probe, study_files(inputs[0], size, 1, 0))  # warm-up
                k = 1
                for syntax in inputs:
                    for b in batches:
                        for _ in range(repeats):
                            out.setdefault((syntax, b), []).append(
                                job_times(node, probe, study_files(syntax, size, b, k)))
                            k += 1
                        print(f"  {name}, {syntax}, batch {b}: job "
                              f"{c.median(out[syntax, b]):.2f} s", flush=True)
            finally:
                probe.close()
    finally:
        dest.stop()
        shutil.rmtree(c.WORK / "pipeline" / "inputs", ignore_errors=True)
    return out


def forward_s(bundles: list[Path], batch: int, repeats: int) -> float:
    """Raw forward of every network at ``batch`` (summed), best of ``repeats`` seconds: the
    model at its fastest (a descheduled OpenMP thread on a shared machine can stall one
    forward 10-fold), so the efficiency errs low, never above 1."""
    import torch

    from ai.bundle.load import load_bundle

    total = 0.0
    for d in bundles:
        loaded = load_bundle(d, device=torch.device("cpu"))
        size = loaded.metadata.input.size
        x = torch.rand(batch, 1, size, size)
        with torch.inference_mode():
            loaded.model(x)
            total += min(c.best_of(lambda m=loaded.model, x=x: m(x), repeats))
    return total


def subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "configs").is_dir())


def gradcam(name: str, bundle: Path, batch: int, repeats: int) -> dict[str, Any]:
    import torch
    from monai.visualize import GradCAM as MonaiGradCAM

    from ai.bundle.load import load_bundle
    from ai.gradcam import GradCAM

    loaded = load_bundle(bundle, device=torch.device("cpu"))
    model, layer = loaded.model, loaded.metadata.target_layer
    size = loaded.metadata.input.size
    x = torch.rand(batch, 1, size, size)
    trainable = copy.deepcopy(model).requires_grad_(True)  # as a network built in MONAI
    ours = GradCAM(model, layer)
    monai_full = MonaiGradCAM(nn_module=trainable, target_layers=layer)
    monai_frozen = MonaiGradCAM(nn_module=copy.deepcopy(model), target_layers=layer)
    x_grad = x.clone().requires_grad_(True)
    def forward() -> None:
        with torch.inference_mode():
            model(x)

    cases = {
        "forward": forward,
        "ai.gradcam": lambda: ours(x, 0),
        "monai full backward": lambda: monai_full(x, class_idx=0),
        "monai, frozen weights": lambda: monai_frozen(x_grad, class_idx=0),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in cases.items():  # interleaved so drift hits every case alike
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    ours.close()
    med = {k: c.median(v) for k, v in times.items()}
    return {"network": name, "batch": batch, "repeats": repeats, "times_s": times,
            "median_s": med, "overhead": {k: v / med["forward"] for k, v in med.items()}}


def main(argv: list[str] | None = None) -> int:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--batches", type=int, nargs="*",
                   help="default: 1 and the worker's batch")
    p.add_argument("--repeats", type=int, help="studies per cell (default 5, quick 1)")
    p.add_argument("--rows", type=int, default=SIZE["rows"])
    p.add_argument("--columns", type=int, default=SIZE["columns"])
    p.add_argument("--inputs", nargs="*", choices=list(INPUTS),
                   help="input syntaxes (default both; quick: JPEG 2000)")
    p.add_argument("--nets", nargs="*", default=["demo pair", "DenseNet121 224 px"],
                   choices=["demo pair", "DenseNet121 224 px"])
    c.torch_threads(p)
    args = p.parse_args(argv)
    c.set_torch_threads(args.threads)
    busy = {"start": c.busy_warning()}
    batches = args.batches or [1, worker_batch()]
    repeats = args.repeats or (1 if args.quick else 5)
    size = {"rows": args.rows, "columns": args.columns}
    inputs = args.inputs or (["JPEG 2000"] if args.quick else list(INPUTS))
    demo_root, demo = demo_bundles(args.quick)
    d121 = c.make_random_bundle(c.WORK / "bundles" / "densenet121-224", network="densenet121",
                                size=224)
    nets = {"demo pair": (demo, subdirs(demo_root)),
            "DenseNet121 224 px": ({"models.bundles": [str(d121)]}, [d121])}
    pipe = []
    for name in args.nets:
        overrides, bundles = nets[name]
        jobs = run_node(name, overrides, size, inputs, batches, repeats)
        for b in batches:
            fwd = forward_s(bundles, b, 10)
            for syntax in inputs:
                e2e = c.median(jobs[syntax, b])
                pipe.append({"network": name, "input": syntax, "batch": b,
                             "n": len(jobs[syntax, b]), "job_s": jobs[syntax, b],
                             "end_to_end_images_per_s": b / e2e, "forward_s": fwd,
                             "forward_images_per_s": b / fwd,
                             "ratio": st.efficiency(b, e2e, fwd)})
    cams = [gradcam(name, bundles[0], 1, max(3, repeats + 2))
            for name, (_, bundles) in ((k, nets[k]) for k in args.nets)]
    print()
    c.table(["network", "input", "batch", "n", "job s", "end-to-end img/s",
             "raw forward img/s", "efficiency", f">= {TARGET_EFFICIENCY}"],
            [(r["network"], r["input"], r["batch"], r["n"], c.median(r["job_s"]),
              r["end_to_end_images_per_s"], r["forward_images_per_s"], f"{r['ratio']:.3f}",
              "ok" if r["ratio"] >= TARGET_EFFICIENCY else "MISSED") for r in pipe],
            title=f"Pipeline efficiency, real node job, CPU ({os.cpu_count()} cores), "
                  f"{size['rows']} x {size['columns']}; target at batch 1 (DenseNet121); "
                  "anchor (MONAI model zoo) ~0.28")
    print()
    c.table(["network", "batch", "forward ms", "ai.gradcam ms", "monai full ms",
             "monai frozen ms", "ai.gradcam / fwd", "monai full / fwd", "monai frozen / fwd"],
            [(r["network"], r["batch"], 1000 * r["median_s"]["forward"],
              1000 * r["median_s"]["ai.gradcam"], 1000 * r["median_s"]["monai full backward"],
              1000 * r["median_s"]["monai, frozen weights"],
              f"{r['overhead']['ai.gradcam']:.2f}x",
              f"{r['overhead']['monai full backward']:.2f}x",
              f"{r['overhead']['monai, frozen weights']:.2f}x") for r in cams],
            title=f"Grad-CAM of one class: (forward + CAM) / forward; target <= "
                  f"{TARGET_GRADCAM}x (demo pair: its classifier)")
    busy["end"] = c.busy_warning()
    c.write_results("pipeline", {"quick": args.quick, "machine_busy": busy, "size": size,
                                 "inputs": inputs, "batches": batches, "pipeline": pipe,
                                 "gradcam": cams}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
