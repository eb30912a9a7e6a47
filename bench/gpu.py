"""GPU inference and training throughput of the node's networks (what ``bench/gpu.sh`` runs).

Why: the issue's latency target on a GPU (under 1 s) and the training tool's speed depend on
what one card does with these networks, and the same script must give comparable figures on
any CUDA machine in one go. Networks: DenseNet121 at 224 px (the classifier shape the node
runs for real bundles) and the demo detector (half-width ResNet-10 RetinaNet, 256 px, as
``training/demo_detector.py`` builds it); random weights (throughput does not depend on them).
Variants: fp32, AMP (``torch.autocast`` float16), AMP + ``channels_last``; batch 1, 8, 32.

* inference images/s: ``torch.inference_mode`` forward (the detector includes its box
  decoding and NMS, as the node runs it), CUDA-synchronised, median of ``--iters``;
* training images/s: one optimiser step (forward, loss, backward, SGD step; the detector with
  its ATSS matcher and hard negative sampler on one synthetic box per image), with a
  ``GradScaler`` under AMP.

``--dry-run`` runs every code path on CPU at tiny sizes (no figures worth reading), so the
script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

VARIANTS = ("fp32", "amp", "amp+channels_last")
NO_CUDA = ("bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False). Run it on "
           "a machine with an NVIDIA GPU and a CUDA build of torch; --dry-run checks the "
           "script on CPU.")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, one iteration: checks the code paths only")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=20, help="timed iterations per cell")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches) or args.iters < 1 or args.warmup < 0:
        p.error("batches and --iters must be >= 1, --warmup >= 0")
    if args.dry_run:
        args.batches, args.iters, args.warmup = [1, 2], 1, 0
    return args


def networks(dry_run: bool) -> dict[str, tuple[Any, int, str]]:
    """name -> (model, input size, task)."""
    from monai.networks.nets import DenseNet121

    from ai.detection import build_detector, configure_for_training

    net = {"init_features": 8, "growth_rate": 4, "block_config": (1, 1, 1, 1)} if dry_run else {}
    from monai.networks.nets import DenseNet

    classifier = (DenseNet(spatial_dims=2, in_channels=1, out_channels=5, **net) if dry_run
                  else DenseNet121(spatial_dims=2, in_channels=1, out_channels=5))
    det_args = {"backbone": "resnet10", "widen_factor": 0.5, "fpn_channels": 32,
                "head_convs": 2}
    detector = build_detector(det_args, num_classes=1)
    configure_for_training(detector, det_args)
    return {"DenseNet121 224 px": (classifier, 64 if dry_run else 224, "classification"),
            "demo detector 256 px": (detector, 64 if dry_run else 256, "detection")}


def timed(fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cell(model: Any, task: str, size: int, batch: int, variant: str, device: Any,
         iters: int, warmup: int) -> dict[str, float]:
    """Inference and training images/s of one (network, batch, variant)."""
    import torch

    amp = variant.startswith("amp")
    fmt = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    x = torch.rand(batch, 1, size, size, device=device).to(memory_format=fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = lambda: torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda"  # noqa: E731
                                      else torch.bfloat16, enabled=amp)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(x)

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    y = torch.randint(0, 2, (batch, 5), device=device).float()
    boxes = [{"boxes": torch.tensor([[size * 0.3, size * 0.3, size * 0.5, size * 0.5]],
                                    device=device),
              "labels": torch.zeros(1, dtype=torch.long, device=device)} for _ in range(batch)]

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            if task == "classification":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            else:
                losses = model(list(x), boxes)
                loss = sum(losses.values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    inf_s = timed(infer, iters, warmup, sync)
    train_s = timed(train, iters, warmup, sync)
    model.to(memory_format=torch.contiguous_format)
    return {"inference_images_per_s": batch / inf_s, "training_images_per_s": batch / train_s}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA)
        return 2
    import _common as c

    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    busy = {"start": c.busy_warning()}
    rows, out = [], []
    for net, (model, size, task) in networks(args.dry_run).items():
        for batch in args.batches:
            for variant in VARIANTS:
                r = cell(model, task, size, batch, variant, device, args.iters, args.warmup)
                out.append({"network": net, "batch": batch, "variant": variant, **r})
                rows.append((net, batch, variant, r["inference_images_per_s"],
                             r["training_images_per_s"]))
            print(f"  {net} batch {batch} done", flush=True)
    c.table(["network", "batch", "variant", "inference img/s", "training img/s"], rows,
            title=f"\nGPU benchmark on {name} (torch {torch.__version__}; median of "
                  f"{args.iters} iterations)")
    busy["end"] = c.busy_warning()
    c.write_results("gpu", {"dry_run": args.dry_run, "device_name": name, "rows": out,
                            "machine_busy": busy}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
