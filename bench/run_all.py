"""Run every benchmark (quick by default, ``--full`` for the full sizes) and print a summary.

Each benchmark runs in its own process (``bench/<name>.py``), prints its own tables and
writes ``var/bench/results/<name>-<timestamp>.json``; the summary below is read back from
those files, so it shows exactly what was recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

BENCHMARKS = ("ingest", "latency", "pipeline", "decode", "outputs")


def run(name: str, full: bool, extra: list[str]) -> tuple[Path | None, float, int]:
    cmd = [sys.executable, str(c.ROOT / "bench" / f"{name}.py"), *([] if full else ["--quick"]),
           *extra]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=c.ROOT, stdout=subprocess.PIPE, text=True)
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("results: "):
            result = c.ROOT / line.split(": ", 1)[1].strip()
    return result, time.perf_counter() - t, proc.wait()


def summarise(name: str, doc: dict[str, Any]) -> list[str]:
    if name == "ingest":
        return [f"ingest {x['corpus']} x{x['instances']}, {x['parallel']} assoc: node "
                f"{x['node']['instances_per_s']:.0f} inst/s ({x['node']['mb_per_s']:.0f} MB/s) = "
                f"{x['ratio']:.2f}x storescp (bare pynetdicom {x['pynetdicom_ratio']:.2f}x)"
                for x in doc["cells"]]
    if name == "latency":
        lines = []
        for model, m in doc["models"].items():
            for r in m["rows"]:
                if r["variant"].startswith("steady"):
                    lines.append(f"latency {model}, steady load: p50 {r['p50_s']:.2f} s, p95 "
                                 f"{r['p95_s']:.2f} s (n={r['n']})")
                else:
                    lines.append(f"latency {model}, {r['variant']}: p50 {r['p50_s']:.2f} s "
                                 f"(excl. quiet {r['p50_excl_quiet_s']:.2f} s = "
                                 f"{r['p50_excl_quiet_s'] / r['floor_s']:.0f}x floor "
                                 f"{1000 * r['floor_s']:.0f} ms), p95 {r['p95_s']:.2f} s")
        return lines
    if name == "pipeline":
        lines = [f"pipeline {r['network']} batch {r['batch']}: "
                 f"{r['end_to_end_images_per_s']:.2f} img/s end-to-end vs "
                 f"{r['forward_images_per_s']:.1f} forward = {r['ratio']:.3f}"
                 for r in doc["pipeline"]]
        lines += [f"grad-cam {r['network']} batch {r['batch']}: ai.gradcam "
                  f"{r['overhead']['ai.gradcam']:.2f}x forward, monai full backward "
                  f"{r['overhead']['monai full backward']:.2f}x" for r in doc["gradcam"]]
        return lines
    if name == "decode":
        return [f"decode {x['size']}px {x['codec']}: {x['median_ms']:.0f} ms "
                f"({x['ratio']:.0f}x uncompressed)" for x in doc["cases"] if not x["plugin"]]
    if name == "outputs":
        return [f"outputs {doc['rows']} x {doc['columns']}: build+write+send of SR, SC, GSPS, "
                f"SEG {doc['ratio_all']:.2f}x faster than before issue 11 "
                f"({doc['ratio_all_uncompressed_sc']:.2f}x with the SC uncompressed)"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--full", action="store_true", help="full sizes (tens of minutes)")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument("--bundle", help="a real model bundle for bench/latency.py as well")
    p.add_argument("--threads", help="torch threads for latency and pipeline (see their --help)")
    args = p.parse_args(argv)
    summary, failed = [], []
    for name in args.only:
        extra = ["--bundle", args.bundle] if name == "latency" and args.bundle else []
        if args.threads and name in ("latency", "pipeline"):
            extra += ["--threads", args.threads]
        path, elapsed, rc = run(name, args.full, extra)
        if rc != 0 or path is None:
            failed.append(name)
            summary.append(f"{name}: FAILED (exit {rc})")
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        summary += summarise(name, doc) + [f"  ({name}: {elapsed:.0f} s, {c.rel(path)})"]
    print("\n=== summary (" + ("full" if args.full else "quick") + ")")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
