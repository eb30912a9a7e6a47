"""Pipeline efficiency and Grad-CAM overhead, each against the raw model forward.

**Pipeline** (QUALITY.md, Performance 3): end-to-end images/s of what a job does between
reading its spool files and writing its results -- parse the Part 10 bytes, ``Analyzer.analyze``
(decode, grayscale pipeline, letterbox, forward, Grad-CAM, boxes, heatmap back to source
pixels) and ``build_outputs`` (SR + SC + GSPS) with every object encoded by ``dcmwrite`` --
divided by the raw forward images/s of the same network, batch and device
(``torch.inference_mode`` on random tensors). The node's fsync of the results and its
database commit are not part of it (``bench/latency.py`` covers them). Inputs: one study of
``batch`` phantom images (default ``dx_mono2_explicit``, 2000 x 2500, uncompressed, so
the codec is not what is measured; ``bench/decode.py`` covers codecs). Networks: random
DenseNet121 at 224 px (built with ``ai.bundle``) and the tests' tiny DenseNet at 64 px.

**Grad-CAM** (QUALITY.md, Performance 4): (forward + CAM of one class) / forward, for
``ai.gradcam.GradCAM`` (gradient only from the score down to the target layer, on the
frozen bundle model as the node runs it) and for ``monai.visualize.GradCAM`` (a full
backward: the same weights with ``requires_grad`` on, as a network built in MONAI has them;
and with frozen weights and an input that requires grad, the cheapest full backward).
Same target layer, batch and device; median of the repeats.
"""

from __future__ import annotations

import copy
import io
import os
import time
from pathlib import Path
from typing import Any

import _common as c


def inputs(variant: str, rows: int, columns: int, batch: int) -> list[bytes]:
    base = c.WORK / "pipeline"
    tmpl = c.synth_file(base / f"template-{variant}-{rows}x{columns}.dcm", variant, seed=11,
                        rows=rows, columns=columns)
    out = base / f"study-{variant}-{rows}x{columns}-{batch}"
    files = sorted(out.glob("*.dcm")) if out.exists() else []
    if len(files) != batch:
        c.fresh_dir(out)
        files = c.clone_instances(tmpl, out, batch, per_study=batch, tag=f"pipeline-{batch}")
    return [f.read_bytes() for f in files]


def stage_times(analyzer: Any, blobs: list[bytes]) -> dict[str, float]:
    """One pass through the job's steps, each timed (seconds for the whole batch)."""
    import pydicom

    from ai.pixels import preprocess
    from dicom_node.outputs import OutputSettings, build_outputs

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    datasets = [pydicom.dcmread(io.BytesIO(b)) for b in blobs]
    t["parse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = analyzer.analyze(datasets)
    t["analyze"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    objects = build_outputs(list(zip(datasets, results, strict=True)), OutputSettings(),
                            "bench-pipeline")
    t["build_outputs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for obj in objects:
        pydicom.dcmwrite(io.BytesIO(), obj.dataset, enforce_file_format=True)
    t["encode"] = time.perf_counter() - t0
    t["end_to_end"] = sum(t.values())
    # the decode + preprocess share of `analyze`, measured on fresh datasets
    fresh = [pydicom.dcmread(io.BytesIO(b)) for b in blobs]
    params = analyzer._runners[0].meta.input.preprocess_params(analyzer.max_pixels)
    t0 = time.perf_counter()
    for ds in fresh:
        preprocess(ds, params)
    t["decode_preprocess"] = time.perf_counter() - t0
    return t


def forward_times(model: Any, x: Any, repeats: int) -> list[float]:
    import torch

    with torch.inference_mode():
        model(x)
        return c.best_of(lambda: model(x), repeats)


def pipeline(name: str, bundle: Path, blobs: list[bytes], repeats: int) -> dict[str, Any]:
    import torch

    from ai.inference import Analyzer

    batch = len(blobs)
    analyzer = Analyzer([bundle], device="cpu", gradcam=True, batch_size=batch)
    runner = analyzer._runners[0]
    x = torch.rand(batch, 1, size := runner.meta.input.size, size)
    stage_times(analyzer, blobs)  # warm-up: allocator, lazy imports, codec handles
    passes, forwards = [], []
    for _ in range(repeats):  # interleaved: a busy spell on the machine hits both alike
        forwards += forward_times(runner.bundle.model, x, 3)
        passes.append(stage_times(analyzer, blobs))
    forwards += forward_times(runner.bundle.model, x, 3)
    stages = {k: c.median([p[k] for p in passes]) for k in passes[0]}
    fwd = c.median(forwards)
    e2e_ips, fwd_ips = batch / stages["end_to_end"], batch / fwd
    return {"network": name, "batch": batch, "repeats": repeats, "stages_s": stages,
            "passes": passes, "forward_s": fwd, "forwards_s": forwards, "end_to_end_images_per_s": e2e_ips,
            "forward_images_per_s": fwd_ips, "ratio": e2e_ips / fwd_ips}


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
    p.add_argument("--variant", default="dx_mono2_explicit")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--columns", type=int, default=2500)
    p.add_argument("--batches", type=int, nargs="*", help="default 1 8 (quick: 1)")
    p.add_argument("--repeats", type=int, help="default 5 (quick 2)")
    c.torch_threads(p)
    args = p.parse_args(argv)
    c.set_torch_threads(args.threads)
    batches = args.batches or ([1] if args.quick else [1, 8])
    repeats = args.repeats or (2 if args.quick else 5)
    nets = {
        "DenseNet121 224 px": c.make_random_bundle(c.WORK / "bundles" / "densenet121-224",
                                                   network="densenet121", size=224),
        "tiny DenseNet 64 px": c.make_random_bundle(c.WORK / "bundles" / "tiny-densenet-64"),
    }
    pipe, cams = [], []
    for b in batches:
        blobs = inputs(args.variant, args.rows, args.columns, b)
        for name, bundle in nets.items():
            pipe.append(pipeline(name, bundle, blobs, repeats))
    for name, bundle in nets.items():
        cams.append(gradcam(name, bundle, batches[0], max(3, repeats + 1)))
    print()
    c.table(["network", "batch", "parse", "decode+prep", "rest of analyze", "build outputs",
             "encode", "end-to-end img/s", "raw forward img/s", "e2e / forward"],
            [(r["network"], r["batch"], 1000 * r["stages_s"]["parse"] / r["batch"],
              1000 * r["stages_s"]["decode_preprocess"] / r["batch"],
              1000 * (r["stages_s"]["analyze"] - r["stages_s"]["decode_preprocess"]) / r["batch"],
              1000 * r["stages_s"]["build_outputs"] / r["batch"],
              1000 * r["stages_s"]["encode"] / r["batch"], r["end_to_end_images_per_s"],
              r["forward_images_per_s"], f"{r['ratio']:.3f}") for r in pipe],
            title=f"Pipeline, CPU ({os.cpu_count()} cores), {args.variant} {args.rows}x"
                  f"{args.columns}; stage columns in ms per image; anchor e2e/forward ~0.28")
    print()
    c.table(["network", "batch", "forward ms", "ai.gradcam ms", "monai full ms",
             "monai frozen ms", "ai.gradcam / fwd", "monai full / fwd", "monai frozen / fwd"],
            [(r["network"], r["batch"], 1000 * r["median_s"]["forward"],
              1000 * r["median_s"]["ai.gradcam"], 1000 * r["median_s"]["monai full backward"],
              1000 * r["median_s"]["monai, frozen weights"],
              f"{r['overhead']['ai.gradcam']:.2f}x",
              f"{r['overhead']['monai full backward']:.2f}x",
              f"{r['overhead']['monai, frozen weights']:.2f}x") for r in cams],
            title="Grad-CAM of one class: (forward + CAM) / forward; expected ~1.1x vs ~3x")
    c.write_results("pipeline", {"quick": args.quick, "variant": args.variant,
                                 "size": [args.rows, args.columns], "pipeline": pipe,
                                 "gradcam": cams}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
