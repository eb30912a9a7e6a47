"""Several receiver processes behind one DICOM port (``dicom.receiver_processes``,
SO_REUSEPORT): real sockets, real ``storescu``, a real SQLite file.

* two receiver processes of one node on one port take 16 parallel ``storescu``
  associations (SQLite and PostgreSQL): every acknowledged instance is stored exactly once
  (one row, one spool file), both processes received associations (the audit trail names
  the receiving process), a release in a child wakes the parent's assembler over the pipe,
  no child loads torch;
* kill -9 of one receiver while associations arrive: what was acknowledged is durable, the
  other keeps accepting on the port, and the pool restarts the killed one;
* two receivers started apart on one port both bind when both reuse it; without reuse the
  second fails with a message that says so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, storescu, wait_until
from helpers.acks import acked_uids, storescu_async
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, studies
from sqlalchemy import func, select

from dicom_node.audit import AuditKind
from dicom_node.config import Settings
from dicom_node.roles import ALL
from dicom_node.service import Node
from dicom_node.store import db
from dicom_node.web import create_app

pytestmark = pytest.mark.integration

ASSOCIATIONS = 16


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return node_settings(tmp_path / "node", quiet=3600.0, **{
        "dicom.receiver_processes": 2, "studies.release_grace_s": 0.2,
        "dicom.max_associations": 32, "dicom.max_associations_per_calling_ae": 32, **extra})


def _start(settings: Settings) -> Node:
    node = Node(settings, lambda _s: FakeAnalyzer(), roles=ALL)
    node.start()  # returns once every receiver process listens
    return node


def _studies_of(folder: Path, n: int, images: int) -> list[list[Path]]:
    """``n`` one-study groups of small images (one group per association)."""
    groups = []
    for s in range(n):
        study = pydicom.uid.generate_uid()
        groups.append([write(make_image(study_uid=study, seed=s * 10 + i, rows=64, cols=64),
                             folder / f"s{s}") for i in range(images)])
    return groups


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _receivers_of_associations(settings: Settings) -> Counter[str]:
    """Accepted associations per receiving process, from the node's audit trail."""
    e = db.audit_events.c
    rows = query(settings, select(e.subject).where(
        e.kind == str(AuditKind.ASSOCIATION_ACCEPTED)))
    return Counter(r.subject for r in rows)


def _no_torch(pid: int) -> bool:
    return "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def _check_stored_once(settings: Settings, node: Node, uids: set[str]) -> None:
    rows = query(settings, select(db.instances))
    assert Counter(r.sop_instance_uid for r in rows) == Counter(uids)  # one row each
    files = [p for p in (node.spool.root / "instances").rglob("*") if p.is_file()]
    assert len(files) == len(uids)  # one spool file each, nothing left beside them
    assert {_uid(node.spool.path(r.path)) for r in rows} == uids


def test_two_receiver_processes_on_one_port_store_every_instance_once(tmp_path: Path,
                                                                      db_url: str) -> None:
    """On SQLite (a real file) and PostgreSQL (the throw-away cluster)."""
    # the assembler polls every 30 s: only a release's wake-up completes a study sooner
    settings = _settings(tmp_path, **{"database.url": db_url, "studies.poll_interval_s": 30})
    groups = _studies_of(tmp_path / "in", ASSOCIATIONS, 3)
    node = _start(settings)
    try:
        pids = node.receivers.pids()  # type: ignore[union-attr]
        assert len(pids) == 2 and node.server is None and node.listening
        wait_until(lambda: node.ready, 30, what="the fake model loaded")
        readyz = create_app(settings, node, testing=True).test_client().get("/readyz")
        assert readyz.status_code == 200 and readyz.get_json()["checks"]["listener"] == "up"
        results: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda g=g: results.append(
            storescu(settings.dicom.port, g, timeout=120))) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert [r.returncode for r in results] == [0] * ASSOCIATIONS, \
            [r.stderr[-300:] for r in results if r.returncode]
        _check_stored_once(settings, node, {_uid(f) for g in groups for f in g})

        # each child audits under its own slot and pid: both received associations
        per_process = _receivers_of_associations(settings)
        assert sum(per_process.values()) == ASSOCIATIONS
        assert len(per_process) == 2, per_process
        owners = [re.fullmatch(r".+:receiver\.(\d+):(\d+)", s) for s in per_process]
        assert all(owners), per_process  # owner id (receiver slot) and pid
        assert {int(m.group(2)) for m in owners if m} == set(pids)
        assert len({m.group(1) for m in owners if m}) == 2  # a slot each
        # a release in a child woke the parent's assembler over the pipe: every study done
        # within its poll interval, long before the quiet hour (each then ignored: 64 px
        # images are below the selection's minimum size)
        wait_until(lambda: {s.state for s in studies(settings).values()} == {"ignored"}, 20,
                   what="every study completed by its association's release")
        assert all(_no_torch(pid) for pid in pids)
    finally:
        node.stop()
    assert not node.receivers.pids()  # type: ignore[union-attr]


def test_kill9_of_one_receiver_the_other_keeps_accepting_and_it_is_restarted(
        tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    groups = _studies_of(tmp_path / "in", 8, 10) + _studies_of(tmp_path / "later", 4, 4)
    node = _start(settings)
    pool = node.receivers
    assert pool is not None
    try:
        # traffic in flight: 8 verbose senders; a receiver dies once it has accepted one of
        # them and some rows are durable, before every instance is
        running = [storescu_async(settings.dicom.port, g) for g in groups[:8]]
        total = sum(len(g) for g in groups[:8])
        engine = db.make_engine(settings.database_url)

        def receiver_mid_traffic() -> int | None:
            e = db.audit_events.c
            with engine.connect() as conn:
                stored = conn.execute(select(func.count()).select_from(db.instances)).scalar()
                served = {int(s.rsplit(":", 1)[1]) for s in conn.execute(select(e.subject).where(
                    e.kind == str(AuditKind.ASSOCIATION_ACCEPTED))).scalars()}
            busy = sorted(served & set(pool.pids()))
            return busy[0] if busy and 4 <= (stored or 0) < total else None

        try:
            victim = wait_until(receiver_mid_traffic, 60, interval=0.01,
                                what="a receiver process mid-traffic")
        finally:
            engine.dispose()
        (survivor,) = set(pool.pids()) - {victim}
        os.kill(victim, signal.SIGKILL)
        acked: set[str] = set()
        failed = 0
        for proc, lines, reader in running:
            failed += proc.wait(120) != 0
            reader.join(10)
            acked |= acked_uids(lines)
        stored = {r.sop_instance_uid for r in query(settings, select(db.instances))}
        assert acked and acked <= stored  # ACK subset of DURABLE across the kill

        # the port still accepts: the PACS re-sends what was not acknowledged, and the
        # later studies arrive; every association succeeds (the survivor, or the restarted
        # child once it listens, serves it)
        first = [f for g in groups[:8] for f in g]
        resend = [f for f in first if _uid(f) not in acked]
        for g in [resend, *groups[8:]] if resend else groups[8:]:
            res = storescu(settings.dicom.port, g, timeout=60)
            assert res.returncode == 0, res.stderr[-300:]
        wait_until(lambda: pool.restarts == 1 and len(pool.pids()) == 2
                   and victim not in pool.pids() and pool.listening() == 2, 60,
                   what="the killed receiver process restarted and listening")
        assert survivor in pool.pids()
        restarted = next(p for p in pool.pids() if p != survivor)
        assert _no_torch(restarted)
        rows = query(settings, select(db.instances))
        everything = {_uid(f) for g in groups for f in g}
        assert Counter(r.sop_instance_uid for r in rows) == Counter(everything)  # once each
        print(f"\nreceiver kill -9: {len(acked)} of {total} acknowledged before the kill "
              f"({failed} of 8 associations cut), all durable; {len(resend)} re-sent and "
              f"{len(everything) - total} more over the port after it: {len(rows)} stored "
              f"once each; the killed process restarted (pid {victim} -> {restarted})")
    finally:
        node.stop()


def test_second_receiver_on_the_port_binds_with_reuse_and_fails_clearly_without(
        tmp_path: Path) -> None:
    shared = _settings(tmp_path, **{"dicom.receiver_processes": 1, "dicom.reuse_port": True})
    first = Node(shared, roles=frozenset({"receiver"}))
    first.start()
    try:
        # another receiver started apart on the same port, reusing it too: both listen
        second = Node(shared, roles=frozenset({"receiver"}))
        second.start()
        try:
            assert first.server.server_address == second.server.server_address
            f = write(make_image(seed=1), tmp_path / "in")
            assert storescu(shared.dicom.port, [f]).returncode == 0
        finally:
            second.stop()
        # without reuse_port the bind fails, and dicom-node serve says why (exit status 2)
        out = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--role",
                              "receiver", "--data-dir", str(tmp_path / "other"), "--port",
                              str(shared.dicom.port)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        err = out.stderr
        assert out.returncode == 2, err[-500:]
        assert re.search(rf"DICOM port 127\.0\.0\.1:{shared.dicom.port} is already in use "
                         r"by another process \(several receivers on one port need "
                         r"dicom\.reuse_port: true", err), err
    finally:
        first.stop()
