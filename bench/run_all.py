"""Run every benchmark (quick by default, ``--full`` for the issue's sample counts) and print
one summary table: each of the issue's targets next to what this run measured.

Each benchmark runs in its own process (``bench/<name>.py``), prints its own tables and
writes ``var/bench/results/<name>-<timestamp>.json``; the summary is read back from those
files, so it shows exactly what was recorded, and is itself written as
``var/bench/results/summary-<timestamp>.json``. A benchmark whose JSON lacks a field the
summary expects (another change renamed it) gives a row saying so, not a crash.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c
import _stats as st

BENCHMARKS = ("latency", "pipeline", "ingest", "decode", "outputs", "rss")


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


def latency_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    out = []
    for r in doc["rows"]:
        if "latency_s" in r:  # the first study after a start: one sample, context
            out.append(st.Verdict(f"latency {r['mode']}, {r['syntax']}", "(context, n=1)",
                                  f"{r['latency_s']:.2f} s (the next ones p50 "
                                  f"{r['next_p50_s']:.2f} s)", None))
            continue
        lat = r.get("latencies_s", [])
        measured = f"p95 {st.p95_label(lat)}"
        name = f"latency {r['mode']}, {r['syntax']}"
        if "queue_grew" in r:
            measured += ", queue " + ("GREW" if r["queue_grew"] else "stable")
            out.append(st.Verdict(name, f"p95 <= {r['target_s']:g} s, no queue growth",
                                  measured, bool(r["ok"])))
        elif r["mode"] == "shipped":
            out.append(st.at_most(name, r["p95_s"], r["target_s"], measured, " s"))
        else:  # without the completion wait: what the rest of the path costs
            out.append(st.Verdict(name, "(context)", measured, None))
    return out


def pipeline_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    out = []
    for r in doc["pipeline"]:
        name = f"pipeline {r['network']}, {r['input']}, batch {r['batch']}"
        measured = (f"{r['ratio']:.3f} ({r['end_to_end_images_per_s']:.2f} vs "
                    f"{r['forward_images_per_s']:.1f} img/s, n={r['n']})")
        if r["network"].startswith("DenseNet121") and r["batch"] == 1:
            out.append(st.at_least(name, r["ratio"], 0.6, measured))
        else:
            out.append(st.Verdict(name, "(context; anchor ~0.28)", measured, None))
    for r in doc["gradcam"]:
        v = r["overhead"]["ai.gradcam"]
        out.append(st.at_most(f"grad-cam {r['network']}, batch {r['batch']}", v, 1.2,
                              f"{v:.2f}x forward", "x"))
    return out


def ingest_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    out = []
    for x in doc["cells"]:
        limit = 0.8 if x["corpus"] == "large" else 0.5
        name = f"ingest {x['corpus']} x{x['instances']}, {x['parallel']} assoc" + (
            f", worker {x['worker']}" if "worker" in x else "")
        out.append(st.at_least(name, x["ratio"], limit,
                               f"{x['ratio']:.2f}x storescp "
                               f"({x['node']['instances_per_s']:.0f} inst/s)", "x"))
    idle = {(x["corpus"], x["parallel"]): x for x in doc["cells"] if x.get("worker") == "idle"}
    for x in doc["cells"]:
        peer = idle.get((x["corpus"], x["parallel"]))
        if x.get("worker") == "busy" and peer is not None:
            rel = x["node"]["instances_per_s"] / peer["node"]["instances_per_s"]
            out.append(st.at_least(f"ingest {x['corpus']}, {x['parallel']} assoc: busy / idle",
                                   rel, 0.9, f"{rel:.2f}"))
    return out


def decode_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    """The node's own decoder per syntax (rows labelled by the decoder actually used)."""
    out, largest = [], doc["cases"][-1]["size"] if doc["cases"] else None
    for x in doc["cases"]:
        if x["size"] != largest or ("node" in x and not x["node"]):
            continue  # smaller sizes, other plugins: context of decode.py's own table
        if "reduce=" in x.get("decoder", "") and "*" not in x["decoder"]:
            continue  # a JPEG 2000 level the Analyzer does not choose
        if "node" not in x and x.get("plugin"):
            continue  # decode.py before the decoder labels
        ratio = x.get("ratio_vs_uncompressed", x.get("ratio", float("nan")))
        label = f" ({x['decoder']})" if "decoder" in x else ""
        out.append(st.Verdict(f"decode {x['size']} px {x['codec']}{label}", "(context)",
                              f"{x['median_ms']:.0f} ms ({ratio:.0f}x uncompressed)", None))
    return out


def outputs_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    return [st.Verdict(f"outputs {doc['rows']} x {doc['columns']}: build+write+send", "(context)",
                       f"{doc['ratio_all']:.2f}x faster than before issue 11 "
                       f"({doc['ratio_all_uncompressed_sc']:.2f}x with the SC uncompressed)",
                       None)]


def rss_rows(doc: dict[str, Any]) -> list[st.Verdict]:
    mb = 1024 * 1024
    return [st.Verdict(f"peak RSS, {doc['parallel']} assoc x {doc['per_association']} large",
                       "(context: vs storescp)",
                       f"node {doc['node']['peak_bytes'] / mb:.0f} MB vs storescp "
                       f"{doc['storescp']['peak_bytes'] / mb:.0f} MB = {doc['ratio']:.1f}x; "
                       f"growth {grow(doc['node']) / mb:.0f} vs {grow(doc['storescp']) / mb:.0f}"
                       " MB",
                       None)]


def grow(r: dict[str, Any]) -> float:
    return float(r["peak_bytes"] - r["idle_bytes"])


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[st.Verdict]]] = {
    "latency": latency_rows, "pipeline": pipeline_rows, "ingest": ingest_rows,
    "decode": decode_rows, "outputs": outputs_rows, "rss": rss_rows,
}


def summarise(name: str, doc: dict[str, Any]) -> list[st.Verdict]:
    try:
        rows = SUMMARIES[name](doc)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return [st.Verdict(name, "-", f"summary needs field {exc} (see its own table)", None)]
    busy = doc.get("machine_busy")
    if any(busy.values()) if isinstance(busy, dict) else busy:
        rows.append(st.Verdict(f"{name}: machine busy", "-", "yes: rough figures", None))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--full", action="store_true",
                   help="the issue's sample counts and sizes (about half an hour on 2 cores)")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument("--threads", help="torch threads for the pipeline's forward (see --help)")
    args = p.parse_args(argv)
    busy = c.busy_warning()
    verdicts: list[st.Verdict] = []
    failed, files = [], {}
    for name in args.only:
        extra = ["--threads", args.threads] if args.threads and name == "pipeline" else []
        path, elapsed, rc = run(name, args.full, extra)
        if rc != 0 or path is None:
            failed.append(name)
            verdicts.append(st.Verdict(name, "-", f"FAILED (exit {rc})", False))
            continue
        files[name] = c.rel(path)
        verdicts += summarise(name, json.loads(path.read_text(encoding="utf-8")))
        print(f"({name}: {elapsed:.0f} s, {c.rel(path)})", flush=True)
    print()
    c.table(["benchmark", "target", "measured", "status"],
            [(v.name, v.target, v.measured, v.status) for v in verdicts],
            title=f"=== summary ({'full' if args.full else 'QUICK: few samples, rough'}; "
                  "ok / MISSED against the issue's targets, '-' = context)")
    c.write_results("summary", {
        "full": args.full, "machine_busy": {"start": busy, "end": c.busy_warning()},
        "results": files, "rows": [v.__dict__ | {"status": v.status} for v in verdicts]})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
