"""Peak memory of the node while 4 parallel associations send large images, vs storescp.

Why (issue 11, "Honest benchmarks"): a node that holds whole data sets in memory per
association, or copies them while writing, grows with parallel senders of large images; a
hospital server runs it beside other services. Measured: the peak resident set (VmRSS summed
over the process and its children: worker or receiver processes count) of

* **the node**: ``dicom-node serve`` as ``make run`` starts it (:class:`_node.NodeProcess`),
  shipped configuration, the demo pair loaded (a one-image warm-up study is analysed first,
  so the model and lazy imports are in memory before the window opens), and
* **the peer**: DCMTK ``storescp --fork`` writing to disk (one child per association),

each sampled every 20 ms while 4 ``storescu`` processes send at once (default 4 x 5 x 18 MB
uncompressed 3000 x 3000 DX; ``--quick`` 4 x 2). The node's resident set before the window
(idle, model loaded) is reported too, so the growth caused by receiving is visible.
"""

from __future__ import annotations

import os
from typing import Any

import _common as c
import _node as n
from latency import Probe, Study, demo_bundles

PARALLEL = 4
SIZE = {"rows": 3000, "columns": 3000}
MB = 1024 * 1024


def corpus(per_association: int) -> list[list[Any]]:
    base = c.WORK / "rss"
    tmpl = c.synth_file(base / f"template-dx-{SIZE['rows']}x{SIZE['columns']}.dcm",
                        "dx_mono2_explicit", seed=21, **SIZE)
    files = base / f"corpus-{PARALLEL}x{per_association}"
    found = sorted(files.glob("*.dcm")) if files.exists() else []
    if len(found) != PARALLEL * per_association:
        c.fresh_dir(files)
        found = c.clone_instances(tmpl, files, PARALLEL * per_association,
                                  per_study=per_association, tag="rss")
    return c.split(found, PARALLEL)


def node_peak(parts: list[list[Any]], models: dict[str, Any]) -> dict[str, float]:
    data = c.fresh_dir(c.WORK / "rss" / "node")
    called = n.settings_value("dicom.ae_title")
    with n.NodeProcess(data, destination=None, overrides=models,
                       log=c.VAR / "logs" / "rss.log") as node:
        import pydicom

        probe = Probe(node.database_url)
        try:
            warm = c.clone_instances(parts[0][0], c.fresh_dir(c.WORK / "rss" / "warm"), 1,
                                     per_study=1, tag="rss-warm")[0]
            uid = str(pydicom.dcmread(warm, stop_before_pixels=True).StudyInstanceUID)
            n.store(node.port, [warm], called)
            wait_job(probe, Study("warm-up", "", "", uid, warm))
        finally:
            probe.close()
        idle = n.tree_rss(node.proc.pid)
        with n.PeakRSS(node.proc.pid) as peak:
            seconds = c.send_parallel(node.port, parts, called=called)
    return {"idle_bytes": idle, "peak_bytes": peak.peak, "samples": peak.samples,
            "send_s": seconds}


def wait_job(probe: Probe, study: Study, timeout: float = 900) -> None:
    """Until the study's job is done (no destination: nothing is delivered)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        probe.collect(study)
        if study.times.get("job_finished"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm-up study was not analysed within {timeout} s")
        time.sleep(0.1)


def storescp_peak(parts: list[list[Any]]) -> dict[str, float]:
    with c.StoreSCP(c.fresh_dir(c.WORK / "rss" / "storescp"), ae_title="PEER",
                    extra=["--fork"]) as scp:
        idle = n.tree_rss(scp.proc.pid)
        with n.PeakRSS(scp.proc.pid) as peak:
            seconds = c.send_parallel(scp.port, parts, called="PEER")
    return {"idle_bytes": idle, "peak_bytes": peak.peak, "samples": peak.samples,
            "send_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--per-association", type=int, help="images per association (5, quick 2)")
    args = p.parse_args(argv)
    busy = {"start": c.busy_warning()}
    per = args.per_association or (2 if args.quick else 5)
    _, models = demo_bundles(args.quick)
    parts = corpus(per)
    size = os.path.getsize(parts[0][0])
    peer = storescp_peak(parts)
    node = node_peak(parts, models)
    ratio = node["peak_bytes"] / peer["peak_bytes"]
    print()
    c.table(["process", "idle MB", "peak MB", "peak - idle MB", "send s", "samples"],
            [(name, r["idle_bytes"] / MB, r["peak_bytes"] / MB,
              (r["peak_bytes"] - r["idle_bytes"]) / MB, r["send_s"], r["samples"])
             for name, r in (("node (demo pair loaded)", node), ("storescp --fork", peer))],
            title=f"peak RSS (process tree) while {PARALLEL} storescu send {per} x "
                  f"{size / 1e6:.0f} MB each at once; node / storescp = {ratio:.1f}x")
    busy["end"] = c.busy_warning()
    c.write_results("rss", {"quick": args.quick, "machine_busy": busy, "parallel": PARALLEL,
                            "per_association": per, "instance_bytes": size, "node": node,
                            "storescp": peer, "ratio": ratio}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
