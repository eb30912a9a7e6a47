"""Ingest while people look: the node's SCP with its web pages fetched, against the same node
with no page fetched, on an empty database and on one grown to a year's rows.

What it shows: whether reading (the dashboard, the studies API, a Prometheus scrape of
``/metrics``, a load balancer's ``/readyz``) holds up receiving. On SQLite one transaction
at a time may write, and the instance rows' group commit waits for the lock whenever another
transaction holds it; every read of the node goes through ``db.reading`` (a deferred BEGIN,
no lock) since 2026-12-06, before which each page held the lock for as long as its queries
ran (README, "Readers off the write lock").

Setup: an in-process :class:`dicom_node.service.Node` as ``dicom-node serve`` wires it, web
enabled, the worker idle (the model never loads; quiet period an hour, so nothing but
ingest and the pages run); ``storescu`` sends the small corpus of ``ingest.py`` (about 42 kB
per instance) over 1 association while a client fetches ``/dashboard/``, ``/api/v1/studies``,
``/metrics`` and ``/readyz`` in turn, ``--rate`` pages a second (default 2: a dashboard open
beside a scrape and a health check). The grown database holds ``--studies`` finished studies
(default 50,000; quick 5,000) received over a year, each with 2 images, a done job, an SR, an
SC and a GSPS sent to one destination and two audit events, written straight into the
node's tables; the files of studies older than 30 days purged as the shipped retention
leaves them (rows kept, ``purged_at`` set).

Printed per database: instances/s with and without the pages (the ratio is the figure), the
ingest writer's BEGIN wait (p50, p99, max, all of it: SQLAlchemy cursor events on the
``ingest-writer`` thread) and the pages' median time.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import _common as c
import ingest
from sqlalchemy import event

TOKEN = "bench-readers-token-0123456789"
PAGES = ("/dashboard/", "/api/v1/studies", "/metrics", "/readyz")
DAY = 86400.0


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def grow(url: str, studies: int, *, now: float | None = None, days: float = 365.0,
         kept_days: float = 30.0, batch: int = 5000) -> None:
    """``studies`` finished studies with their rows, as a node that ran for ``days`` with
    the shipped retention (``max_age_days`` 30) has them: received evenly over those days,
    the files of those older than ``kept_days`` purged (rows kept, ``purged_at`` set)."""
    from sqlalchemy import insert, select

    from dicom_node.store import db

    now = time.time() if now is None else now
    engine = db.make_engine(url)
    try:
        for start in range(0, studies, batch):
            n = min(batch, studies - start)
            with engine.begin() as conn:
                rows = []
                for i in range(n):
                    at = now - DAY * days * (start + i) / max(studies, 1)
                    rows.append({"study_uid": _uid(), "at": at})
                conn.execute(insert(db.studies), [
                    {"study_uid": r["study_uid"], "state": "done", "first_received_at": r["at"],
                     "last_received_at": r["at"], "updated_at": r["at"] + 5} for r in rows])
                first_job = (conn.execute(select(db.jobs.c.id).order_by(db.jobs.c.id.desc())
                                          .limit(1)).scalar() or 0) + 1
                conn.execute(insert(db.jobs), [
                    {"study_uid": r["study_uid"], "state": "done", "attempts": 1,
                     "created_at": r["at"], "started_at": r["at"] + 1,
                     "finished_at": r["at"] + 2, "duration_s": 1.0} for r in rows])
                conn.execute(insert(db.instances), [
                    {"sop_instance_uid": _uid(), "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                     "study_uid": r["study_uid"], "series_uid": _uid(), "modality": "DX",
                     "transfer_syntax": "1.2.840.10008.1.2.1", "path": f"grown/{k}-{j}.dcm",
                     "size": 42_000, "sha256": "0" * 64, "received_at": r["at"],
                     "analysis_state": "analysed", "job_id": first_job + k,
                     "purged_at": _purged(r["at"], now, kept_days)}
                    for k, r in enumerate(rows) for j in range(2)])
                first_output = (conn.execute(select(db.outputs.c.id)
                                             .order_by(db.outputs.c.id.desc()).limit(1))
                                .scalar() or 0) + 1
                kinds = (("sr", "1.2.840.10008.5.1.4.1.1.88.33"),
                         ("sc", "1.2.840.10008.5.1.4.1.1.7"),
                         ("gsps", "1.2.840.10008.5.1.4.1.1.11.1"))
                conn.execute(insert(db.outputs), [
                    {"job_id": first_job + k, "kind": kind, "sop_instance_uid": _uid(),
                     "sop_class_uid": cls, "series_uid": _uid(), "study_uid": r["study_uid"],
                     "path": f"grown/{k}-{kind}.dcm", "created_at": r["at"] + 2,
                     "purged_at": _purged(r["at"], now, kept_days)}
                    for k, r in enumerate(rows) for kind, cls in kinds])
                conn.execute(insert(db.deliveries), [
                    {"output_id": first_output + m, "destination": "PACS", "state": "sent",
                     "attempts": 1, "next_attempt_at": rows[m // 3]["at"] + 2,
                     "created_at": rows[m // 3]["at"] + 2, "sent_at": rows[m // 3]["at"] + 3}
                    for m in range(3 * n)])
                conn.execute(insert(db.audit_events), [
                    {"at": r["at"], "kind": kind, "outcome": "success", "actor": "PACS",
                     "subject": r["study_uid"]}
                    for r in rows for kind in ("instance_received", "delivered")])
    finally:
        engine.dispose()


def _purged(at: float, now: float, kept_days: float) -> float | None:
    return at + kept_days * DAY if now - at > kept_days * DAY else None


class WriterWaits:
    """The ingest writer's ``BEGIN IMMEDIATE`` durations on ``engine`` while attached."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.waits, self._t0 = engine, [], {}

    def _before(self, _conn: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement == "BEGIN IMMEDIATE" and threading.current_thread().name == "ingest-writer":
            self._t0[threading.get_ident()] = time.perf_counter()

    def _after(self, _conn: Any, _cur: Any, statement: str, *_a: Any) -> None:
        t0 = self._t0.pop(threading.get_ident(), None)
        if t0 is not None and statement == "BEGIN IMMEDIATE":
            self.waits.append(time.perf_counter() - t0)

    def __enter__(self) -> WriterWaits:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


def _figures(instances: int, elapsed: float, waits: list[float], page_s: list[float],
             errors: list[str], failure: str | None) -> dict[str, Any]:
    """One run's figures (``elapsed`` NaN and no waits when it failed)."""
    w = sorted(waits)
    return {"instances_per_s": instances / elapsed, "failure": failure, "pages": len(page_s),
            "page_errors": errors, "page_median_s": c.median(page_s) if page_s else None,
            "begin_p50_ms": 1000 * c.percentile(w, 50), "begin_p99_ms": 1000 * c.percentile(w, 99),
            "begin_max_ms": 1000 * max(w) if w else float("nan"),
            "begin_total_ms": 1000 * sum(w), "begins": len(w)}


def run(files: list[Path], data: Path, rate: float) -> dict[str, Any]:
    """One send of ``files`` to a node on ``data``; pages fetched at ``rate``/s (0: none)."""
    web_port = c.free_port()
    settings = c.node_settings(data, quiet=3600.0, **{
        "web.enabled": True, "web.port": web_port, "web.token": TOKEN})
    release = threading.Event()

    def no_model(_settings: Any) -> Any:
        release.wait()
        raise RuntimeError("benchmark: ingest only, no model")

    from dicom_node.service import Node

    node = Node(settings, no_model)
    try:
        node.start()
        c.wait_for_port(settings.dicom.port)
    except Exception as exc:  # noqa: BLE001 - the figure is that it did not start
        release.set()
        try:
            node.stop()  # what did start stops, so it runs beside no later cell
        except Exception:  # noqa: BLE001, S110 - a half-started node may not stop cleanly
            pass
        return _figures(len(files), float("nan"), [], [], [],
                        f"the node did not start: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}")
    stop, page_s, errors = threading.Event(), [], []

    def fetch() -> None:
        i = 0
        while not stop.is_set():
            url = f"http://127.0.0.1:{web_port}{PAGES[i % len(PAGES)]}"
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        url, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=120) as r:
                    r.read()
                page_s.append(time.perf_counter() - t)
            except urllib.error.HTTPError as exc:  # /readyz: 503 while no model is loaded
                exc.read()
                page_s.append(time.perf_counter() - t)
                if exc.code >= 500 and not (exc.code == 503 and "readyz" in url):
                    errors.append(f"{PAGES[i % len(PAGES)]}: HTTP {exc.code}")
            except Exception as exc:  # noqa: BLE001 - counted and printed
                errors.append(f"{PAGES[i % len(PAGES)]}: {type(exc).__name__}")
            i += 1
            stop.wait(1 / rate)

    try:
        with WriterWaits(node.engine) as waits:
            client = threading.Thread(target=fetch, daemon=True)
            if rate > 0:
                client.start()
            try:
                elapsed = c.send_parallel(settings.dicom.port, [files],
                                          called=settings.dicom.ae_title)
            except RuntimeError as exc:  # storescu failed: the node refused or aborted
                elapsed, failure = float("nan"), str(exc)[:300]
            else:
                failure = None
            stop.set()
            if rate > 0:
                client.join(130)
    finally:
        release.set()
        node.stop()
    return _figures(len(files), elapsed, waits.waits, page_s, errors, failure)



def main(argv: list[str] | None = None) -> int:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--instances", type=int, help="small instances sent (default 600, quick 200)")
    p.add_argument("--studies", type=int,
                   help="studies in the grown database (default 50,000, quick 5,000)")
    p.add_argument("--rate", type=float, default=2.0, help="pages fetched per second (2)")
    p.add_argument("--repeats", type=int, help="runs per cell, alternating (default 2, quick 1)")
    args = p.parse_args(argv)
    busy_note = c.busy_warning()
    n = args.instances or (200 if args.quick else 600)
    studies = args.studies or (5000 if args.quick else 50_000)
    repeats = args.repeats or (1 if args.quick else 2)
    files = ingest.corpus("small", n, ingest.SMALL)
    base = c.WORK / "readers"
    from dicom_node.store.schema import head_revision

    # per schema revision: a tree from before a migration refuses a database made after it
    template = {"empty": base / "empty-template",
                "grown": base / f"grown-year-{studies}-r{head_revision()}"}
    c.fresh_dir(template["empty"])
    if not (template["grown"] / "node.db").exists():
        c.fresh_dir(template["grown"])
        t = time.perf_counter()
        grow(f"sqlite:///{template['grown'] / 'node.db'}", studies)
        print(f"grown database: {studies} studies written in {time.perf_counter() - t:.0f} s")
    cells: list[dict[str, Any]] = []
    for name, source in template.items():
        runs: dict[str, list[dict[str, Any]]] = {"no pages": [], "pages": []}
        for rep in range(repeats):
            for label in (["no pages", "pages"] if rep % 2 == 0 else ["pages", "no pages"]):
                data = c.fresh_dir(base / "node-data")
                shutil.rmtree(data)
                shutil.copytree(source, data)
                runs[label].append(run(files, data, args.rate if label == "pages" else 0))
        cells.append({"database": name, "studies": 0 if name == "empty" else studies,
                      "runs": runs})
    shutil.rmtree(base / "node-data", ignore_errors=True)
    rows = []
    for cell in cells:
        quiet = c.median([r["instances_per_s"] for r in cell["runs"]["no pages"]])
        for label, runs in cell["runs"].items():
            rate = c.median([r["instances_per_s"] for r in runs])
            pages = [r["page_median_s"] for r in runs if r["page_median_s"] is not None]
            failed = sum(1 for r in runs if r["failure"])
            rows.append((f"{cell['database']} ({cell['studies']} studies)", label,
                         f"FAILED {failed} of {len(runs)}" if failed else rate,
                         "-" if failed else f"{rate / quiet:.2f}x",
                         max(r["begin_p99_ms"] for r in runs),
                         max(r["begin_max_ms"] for r in runs),
                         max(r["begin_total_ms"] for r in runs),
                         f"{1000 * c.median(pages):.0f} ms" if pages else "-",
                         sum(len(r["page_errors"]) for r in runs)))
    print()
    c.table(["database", "pages", "inst/s", "vs no pages", "writer BEGIN p99 ms", "max ms",
             "waited ms", "page median", "page errors"], rows,
            title=f"Ingest of {n} small instances, 1 association, with pages fetched "
                  f"{args.rate:g}/s (worst of {repeats} runs for the waits, median for inst/s)")
    for cell in cells:
        for label, runs in cell["runs"].items():
            for r in runs:
                if r["failure"]:
                    print(f"{cell['database']}, {label}: {r['failure']}")
    c.write_results("readers", {"quick": args.quick, "instances": n, "rate": args.rate,
                                "cells": cells, "machine_busy": busy_note}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
