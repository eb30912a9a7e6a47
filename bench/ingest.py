"""Ingest throughput: the node's SCP against DCMTK ``storescp``, both fed by DCMTK ``storescu``.

Peer and setup (QUALITY.md, Performance 1):

* **node**: an in-process :class:`dicom_node.service.Node` as ``dicom-node serve`` wires it
  (pynetdicom threaded server, spool with fsync of file and directory, SQLite WAL
  ``synchronous=FULL`` rows, group-committed, INFO logging to a file), in two states:

  - **idle** worker: the model never loads (the analyzer factory waits until the run ends)
    and ``studies.quiet_period_s`` is an hour, so nothing but ingest runs;
  - **busy** worker: the node as it runs by default (default ``workers.*`` settings, so
    process workers when they are the default; the model bundle given with ``--bundle``,
    else a random DenseNet121 at 224 px, a demo-sized network; quiet period 0.5 s), first
    sent ``--busy-studies`` studies that it is still analysing while the corpus arrives (the
    JSON says per run whether jobs were still active when the last ``storescu`` exited:
    ``busy_throughout``); the measured instances are queued for analysis in turn.
* **storescp**: DCMTK ``storescp -od DIR`` writing every instance to disk (default options:
  no fsync). One association at a time for the 1-association cells; ``--fork`` (a process
  per association, DCMTK's way to serve several at once) for the 4-association cells.
* Both are fed by ``storescu -xe`` over loopback; 4 associations = 4 ``storescu`` processes
  started together, each sending a contiguous quarter of the corpus. Time = from starting
  the ``storescu`` processes until the last one exits (association set-up included on both
  sides). Fresh, empty data directory / output directory for every run; peers alternate
  order between repeats; the median of the repeats is reported.

A third layout of the node, **2 receiver processes behind one port**
(``dicom.receiver_processes: 2``, SO_REUSEPORT; worker idle), is measured for the
4-association cells of both corpora (``--receivers N`` changes the count, 1 skips them): the
kernel spreads the 4 ``storescu`` connections over the two processes, each with its own GIL
and group commit, against the same ``storescp --fork`` in the same run. Rows labelled
``idle, 2 receivers``.

A third column, **bare pynetdicom** (pynetdicom's documented store-to-disk handler: file
meta + raw bytes, no fsync, no database, threaded server), separates the framework's cost
from the node's own (durability, database row, header check, logging). The durability
difference is real work the node does and the peers do not; the fsync figure printed at the
end puts it in context.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

SMALL = {"rows": 200, "columns": 100}  # 16-bit, explicit VR: about 41 kB per file
LARGE = {"rows": 3000, "columns": 3000}  # 16-bit DX, uncompressed: about 18 MB per file


def corpus(name: str, count: int, size: dict[str, int]) -> list[Path]:
    base = c.WORK / "ingest"
    template = c.synth_file(base / f"template-{name}.dcm", "dx_mono2_explicit", seed=7, **size)
    out = base / f"corpus-{name}-{count}"
    files = sorted(out.glob("*.dcm")) if out.exists() else []
    if len(files) != count:
        c.fresh_dir(out)
        files = c.clone_instances(template, out, count, tag=f"ingest-{name}")
    return files


class Worker:
    """The node's worker during a run: idle (no model) or busy analysing a queue."""

    def __init__(self, busy: bool, bundle: Path | None = None,
                 queue: list[Path] | None = None, receivers: int = 1) -> None:
        self.busy, self.bundle, self.queue = busy, bundle, queue or []
        self.receivers = receivers  # receiver processes behind the node's one port
        self.name = ("busy" if busy else "idle") + (
            f", {receivers} receivers" if receivers > 1 else "")
        self.busy_throughout: list[bool] = []
        self.commits: list[int | None] = []  # None: one per instance (no group commit)
        self.pdu: int | None = None

    def settings(self, data: Path) -> Any:
        extra: dict[str, Any] = {"dicom.max_associations": 16,
                                 "dicom.receiver_processes": self.receivers}
        if self.pdu:
            extra["dicom.maximum_pdu_size"] = self.pdu
        if not self.busy:
            return c.node_settings(data, quiet=3600.0, **extra)
        return c.node_settings(data, quiet=0.5, **extra, **{
            "models.bundles": [str(self.bundle)], "models.device": "cpu"})

    def fill(self, node: Any) -> None:
        """Send the queue of studies and wait until the worker analyses one of them."""
        if not self.busy:
            return
        port, called = node.settings.dicom.port, node.settings.dicom.ae_title
        c.send_parallel(port, [self.queue], called=called)
        deadline = time.monotonic() + 600
        while _active_jobs(node, "running") == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("busy worker: no job started within 600 s")
            time.sleep(0.1)

    @staticmethod
    def commits_so_far(node: Any) -> int | None:
        if getattr(node, "receivers", None) is not None:
            return None  # the receiver processes commit: not counted from here
        writer = getattr(node.ingestor, "writer", None)  # absent before the group commit
        return writer.commits if writer is not None else None

    def done(self, node: Any, commits_before: int | None) -> None:
        if self.busy:
            self.busy_throughout.append(_active_jobs(node, "queued", "running") > 0)
        after = self.commits_so_far(node)
        self.commits.append(None if after is None or commits_before is None
                            else after - commits_before)


def _active_jobs(node: Any, *states: str) -> int:
    from sqlalchemy import func, select

    from dicom_node.store import db

    with node.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(db.jobs)
                                .where(db.jobs.c.state.in_(states))).scalar_one())


def run_node(files: list[Path], parallel: int, worker: Worker) -> float:
    from sqlalchemy import func, select

    from dicom_node.store import db

    data = c.fresh_dir(c.WORK / "ingest" / "node-data")
    c.configure_logging(c.VAR / "logs" / "ingest-node.log")
    release = threading.Event()

    def no_model(_settings: Any) -> Any:
        release.wait()
        raise RuntimeError("benchmark: ingest only, no model")

    settings = worker.settings(data)
    node = c.start_node(settings, None if worker.busy else no_model)
    try:
        worker.fill(node)
        with node.engine.connect() as conn:
            before = conn.execute(select(func.count()).select_from(db.instances)).scalar_one()
        commits = worker.commits_so_far(node)
        elapsed = c.send_parallel(settings.dicom.port, c.split(files, parallel),
                                  called=settings.dicom.ae_title)
        worker.done(node, commits)
        with node.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(db.instances)
                                  ).scalar_one() - before
    finally:
        release.set()
        node.stop()
    if stored != len(files):
        raise RuntimeError(f"node stored {stored} of {len(files)} instances")
    return elapsed


def run_storescp(files: list[Path], parallel: int) -> float:
    out = c.fresh_dir(c.WORK / "ingest" / "storescp-out")
    extra = ["--fork"] if parallel > 1 else []
    with c.StoreSCP(out, ae_title="STORESCP", extra=extra) as scp:
        elapsed = c.send_parallel(scp.port, c.split(files, parallel), called="STORESCP")
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} instances")
    return elapsed


def run_pynetdicom(files: list[Path], parallel: int) -> float:
    """pynetdicom's own store-to-disk recipe: raw bytes + file meta, no fsync, no database."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, StoragePresentationContexts, evt

    from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES

    out = c.fresh_dir(c.WORK / "ingest" / "pynetdicom-out")

    def handle_store(event: Any) -> int:
        path = out / str(event.request.AffectedSOPInstanceUID)
        with open(path, "wb") as fh:
            fh.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(fh, event.file_meta)
            fh.write(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_associations = 16
    for ctx in StoragePresentationContexts:
        ae.add_supported_context(ctx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    port = c.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        elapsed = c.send_parallel(port, c.split(files, parallel), called="PYNETDICOM")
    finally:
        server.shutdown()
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"pynetdicom stored {stored} of {len(files)} instances")
    return elapsed


def fsync_cost(size: int, n: int = 50) -> float:
    """ms to write ``size`` bytes, fsync the file and fsync its directory (the node's path)."""
    d = c.fresh_dir(c.WORK / "ingest" / "fsync")
    payload = os.urandom(size)
    t = time.perf_counter()
    for i in range(n):
        path = d / f"{i}.bin"
        with open(path, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return 1000 * (time.perf_counter() - t) / n


def measure(name: str, files: list[Path], parallel: int, repeats: int,
            worker: Worker) -> dict[str, Any]:
    total_bytes = sum(p.stat().st_size for p in files)
    worker.busy_throughout, worker.commits = [], []
    runners = {"node": lambda f, p: run_node(f, p, worker), "storescp": run_storescp,
               "pynetdicom": run_pynetdicom}
    times: dict[str, list[float]] = {peer: [] for peer in runners}
    peers = list(runners)
    for rep in range(repeats):
        for peer in peers[rep % 3:] + peers[:rep % 3]:  # rotate the order between repeats
            os.sync()  # the previous run's dirty pages are not this run's cost
            times[peer].append(runners[peer](files, parallel))
    cell: dict[str, Any] = {"corpus": name, "instances": len(files), "bytes": total_bytes,
                            "parallel": parallel, "repeats": repeats, "times_s": times,
                            "worker": worker.name, "receiver_processes": worker.receivers,
                            "busy_throughout": worker.busy_throughout,
                            "node_sqlite_commits": worker.commits,
                            "maximum_pdu_size": worker.pdu}
    for peer, ts in times.items():
        t = c.median(ts)
        cell[peer] = {"median_s": t, "instances_per_s": len(files) / t,
                      "mb_per_s": total_bytes / t / 1e6}
    cell["spread"] = max((max(ts) - min(ts)) / c.median(ts) for ts in times.values())
    cell["ratio"] = cell["node"]["instances_per_s"] / cell["storescp"]["instances_per_s"]
    cell["pynetdicom_ratio"] = (cell["pynetdicom"]["instances_per_s"]
                                / cell["storescp"]["instances_per_s"])
    return cell


def main(argv: list[str] | None = None) -> int:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--small", type=int, help="small instances (default 1000, quick 200)")
    p.add_argument("--large", type=int, help="large instances (default 50, quick 8)")
    p.add_argument("--repeats", type=int, help="repeats per cell (default 3)")
    p.add_argument("--workers", default="idle,busy",
                   help="node worker states to measure: idle, busy or both (default)")
    p.add_argument("--bundle", type=Path,
                   help="model bundle of the busy worker (default: random DenseNet121, 224 px)")
    p.add_argument("--busy-studies", type=int,
                   help="studies (2 images of 1024 x 1024) queued for the busy worker "
                        "(default 40, quick 15)")
    p.add_argument("--pdu", type=int, help="the node's dicom.maximum_pdu_size (default: "
                   "the configuration's default)")
    p.add_argument("--corpora", default="small,large", help="small, large or both (default)")
    p.add_argument("--receivers", type=int, default=2,
                   help="receiver processes behind one port for the extra 4-association "
                        "rows (default 2; 1: no such rows)")
    args = p.parse_args(argv)
    busy_note = c.busy_warning()
    n_small = args.small or (200 if args.quick else 1000)
    n_large = args.large or (8 if args.quick else 50)
    repeats = args.repeats or 3
    sizes_by_name = {"small": (n_small, SMALL), "large": (n_large, LARGE)}
    corpora = {name: corpus(name, *sizes_by_name[name]) for name in args.corpora.split(",")}
    workers = [busy_worker(args) if w == "busy" else Worker(False)
               for w in args.workers.split(",")]
    layouts = [(w, (1, 4)) for w in workers]
    if args.receivers > 1:  # several receiver processes: the parallel case only
        layouts.append((Worker(False, receivers=args.receivers), (4,)))
    cells = []
    for worker, parallels in layouts:
        worker.pdu = args.pdu
        for name, files in corpora.items():
            for parallel in parallels:
                cells.append(measure(name, files, parallel, repeats, worker))
                shutil_cleanup()
    sizes = {k: v[0].stat().st_size for k, v in corpora.items()}
    rows = [(f"{x['corpus']} ({sizes[x['corpus']] / 1e3:.0f} kB) x{x['instances']}",
             x["worker"], x["parallel"], x["node"]["instances_per_s"], x["node"]["mb_per_s"],
             x["storescp"]["instances_per_s"], x["storescp"]["mb_per_s"],
             x["pynetdicom"]["instances_per_s"], f"{x['ratio']:.2f}x",
             f"{x['pynetdicom_ratio']:.2f}x", f"{100 * x['spread']:.0f}%") for x in cells]
    print()
    c.table(["corpus", "worker", "assocs", "node inst/s", "node MB/s", "storescp inst/s",
             "storescp MB/s", "bare pynetdicom inst/s", "node/storescp",
             "bare pynetdicom/storescp", "spread"], rows,
            title=f"Ingest over loopback, storescu -> SCP (median of {repeats}; "
                  f"{os.cpu_count()} CPU cores)")
    fsync_ms = {k: fsync_cost(size, n=50 if k == "small" else 5) for k, size in sizes.items()}
    print("spread: the widest (max - min) / median of the three peers' repeats")
    for x in cells:
        print(f"{x['corpus']} {x['worker']} x{x['parallel']}: node instance-row commits per run "
              f"{x['node_sqlite_commits']} for {x['instances']} instances"
              + (f"; worker busy until the end: {x['busy_throughout']}"
                 if x["worker"] == "busy" else ""))
    costs = ", ".join(f"{ms:.2f} ms per {k} file" for k, ms in fsync_ms.items())
    print(f"\ncontext: write + fsync file + fsync dir = {costs} on this disk (the node does "
          "this, storescp does not); anchor: pynetdicom once reached 0.31x of DCMTK on small "
          "files")
    c.write_results("ingest", {"quick": args.quick, "cells": cells, "machine_busy": busy_note,
                               "fsync_ms": fsync_ms}, not args.no_json)
    return 0


def busy_worker(args: Any) -> Worker:
    bundle = args.bundle or c.make_random_bundle(c.WORK / "bundles" / "random-densenet121-224",
                                                 network="densenet121", size=224)
    studies = args.busy_studies or (15 if args.quick else 40)
    queue = corpus(f"busy-{studies}", 2 * studies, {"rows": 1024, "columns": 1024})
    return Worker(True, bundle, queue)


def shutil_cleanup() -> None:
    import shutil

    for d in ("node-data", "storescp-out", "pynetdicom-out", "fsync"):
        shutil.rmtree(c.WORK / "ingest" / d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
