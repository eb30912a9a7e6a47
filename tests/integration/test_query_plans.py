"""No statement on a study's path scans a table that grows with every study.

A real node (workers as threads, so every statement runs in this process) receives studies
from DCMTK ``storescu`` (a new study, a second version of it, an ignored CT), analyses them
with a fake model and delivers the results to DCMTK ``storescp``; every statement it ran is
then put to SQLite's ``EXPLAIN QUERY PLAN`` on the node's own database file. Before indexes
on ``outputs.study_uid`` and ``jobs.study_uid`` (revision 0006) a study's results and jobs
were found by scanning: retention's search for candidates ran over ten minutes on a database
of 131,072 studies, the job claim's version lookup read every done job under the write lock.
Counts of rows do not matter to the planner's choice here: a small database shows it.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import CT, make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from sqlalchemy import event, select

from dicom_node.store import db

pytestmark = [pytest.mark.integration]

# the tables that grow with every study received (the others grow with runs, destinations
# or configuration)
GROWING = ("instances", "studies", "jobs", "outputs", "deliveries", "findings",
           "ood_verdicts", "audit_events")


def _plan_faults(con: sqlite3.Connection, statement: str, params: Any) -> list[str]:
    plan = [row[3] for row in con.execute("EXPLAIN QUERY PLAN " + statement, params)]
    faults = [step for step in plan
              if re.match(rf"SCAN ({'|'.join(GROWING)})\b", step) and " INDEX " not in step]
    for table in GROWING:  # a study's rows are found through an index on study_uid
        if re.search(rf"\b{table}\.study_uid (=|IN)", statement):
            steps = [s for s in plan if re.match(rf"(SEARCH|SCAN) {table}\b", s)]
            if steps and not any("study_uid" in s for s in steps):
                faults += [f"{table} not by study_uid: {s}" for s in steps]
    return faults


def test_a_studys_path_finds_its_rows_through_indexes(tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=0.3,
                             **{"workers.mode": "thread"})
    node = start_node(settings, lambda _s: FakeAnalyzer())
    ran: dict[str, tuple[str, Any]] = {}
    lock = threading.Lock()

    def record(_conn, _cur, statement: str, params: Any, _ctx, many: bool) -> None:  # type: ignore[no-untyped-def]
        if not many and statement.lstrip().upper().startswith(
                ("SELECT", "INSERT", "UPDATE", "DELETE")):
            with lock:
                ran.setdefault(statement, (threading.current_thread().name, params))

    event.listen(node.engine, "before_cursor_execute", record)
    try:
        first = make_image(seed=1)
        again = make_image(seed=2, study_uid=str(first.StudyInstanceUID))  # a second version
        for i, ds in enumerate([first, make_image(seed=3), make_image(sop_class=CT,
                                                                       modality="CT")]):
            assert storescu(settings.dicom.port, [write(ds, tmp_path / "in", f"{i}.dcm")]
                            ).returncode == 0
        wait_until(lambda: len(query(settings, select(db.jobs))) == 2, 30, what="two jobs")
        assert storescu(settings.dicom.port, [write(again, tmp_path / "in", "again.dcm")]
                        ).returncode == 0
        wait_until(lambda: (r := query(settings, select(db.deliveries))) and len(r) >= 9
                   and all(d.state == "sent" for d in r), 60, what="every result delivered")
    finally:
        node.stop()
        dest.stop()
    threads = {name.split("-")[0] for name, _ in ran.values()}
    assert {"ingest", "assembler", "worker", "sender"} <= threads, threads
    con = sqlite3.connect(tmp_path / "node" / "node.db")
    try:
        faults = {f"[{name}] {' '.join(statement.split())[:200]}": found
                  for statement, (name, params) in ran.items()
                  if (found := _plan_faults(con, statement, params))}
    finally:
        con.close()
    assert faults == {}
