"""Abuse of the listener over real sockets: aborted transfers, bare TCP connects, many short
associations, garbage bytes. The node stays up, loses nothing acknowledged and leaks nothing."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.store import db

pytestmark = pytest.mark.integration


class RecordingProxy:
    """TCP proxy that records what the client sends (to replay a truncated association)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.client_bytes = bytearray()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.client_bytes.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self) -> None:
        client, _ = self.sock.accept()
        self.sock.close()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = node_settings(tmp_path / "node", quiet=0.3, **{"dicom.max_associations": 8,
                                                               "dicom.network_timeout_s": 3})
    n = start_node(settings, lambda s: FakeAnalyzer())
    yield n
    n.stop()


def _replay_truncated(port: int, stream: bytes, cut: int, abort_pdu: bool) -> None:
    rq_len = 6 + int.from_bytes(stream[2:6], "big")  # the A-ASSOCIATE-RQ PDU
    assert stream[0] == 0x01
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(stream[:rq_len])
        assert s.recv(6)[0] == 0x02  # A-ASSOCIATE-AC, then the data as the SCU sent it
        s.sendall(stream[rq_len:cut])
        time.sleep(0.5)
        if abort_pdu:
            s.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-ABORT
            time.sleep(0.2)


@pytest.mark.parametrize("abort_pdu", [True, False])
def test_aborted_mid_store_keeps_earlier_and_leaves_nothing_partial(node, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                     abort_pdu: bool) -> None:
    small = write(make_image(rows=256, cols=256, seed=1), tmp_path / "in")
    big = write(make_image(rows=1500, cols=1500, seed=2), tmp_path / "in")
    proxy = RecordingProxy(node.settings.dicom.port)
    assert storescu(proxy.port, [small, big]).returncode == 0  # record a full association
    stream = bytes(proxy.client_bytes)
    # start again on a fresh node database: wipe what the recording stored
    with node.engine.begin() as conn:
        for table in (db.instances, db.studies):
            conn.execute(table.delete())
    cut = len(stream) - 200_000  # well inside the big image's P-DATA
    _replay_truncated(node.settings.dicom.port, stream, cut, abort_pdu)
    rows = wait_until(lambda: query(node.settings, select(db.instances)), 10,
                      what="the first (complete) instance stored")
    time.sleep(1.0)
    rows = query(node.settings, select(db.instances))
    assert [r.size < 500_000 for r in rows] == [True]  # only the small, complete one
    assert not any((node.spool.root / "tmp").iterdir())
    # the big image (4.5 MB) had its own hashing thread when the transfer broke: it ended
    wait_until(lambda: not any(t.name == "tap-hash" for t in threading.enumerate()), 10,
               what="the aborted data set's hashing thread to end")
    assert query(node.settings, select(db.quarantine)) == []
    assert storescu(node.settings.dicom.port, [big]).returncode == 0  # node still serves


def _threads_and_rss() -> tuple[int, int]:
    with open(f"/proc/{os.getpid()}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
    return threading.active_count(), rss


@pytest.mark.slow
def test_bare_connects_garbage_and_many_short_associations(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = node.settings.dicom.port
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)

    def echo_many(n: int) -> int:
        ok = 0
        for _ in range(n):
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
            if assoc.is_established:
                ok += int(getattr(assoc.send_c_echo(), "Status", -1) == 0)
                assoc.release()
        return ok

    echo_many(20)  # warm up, then measure the baseline
    base_threads, base_rss = _threads_and_rss()
    for _ in range(50):  # bare TCP connects, closed at once or left silent
        s = socket.create_connection(("127.0.0.1", port))
        s.close()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    time.sleep(0.3)
    full = ae.associate("127.0.0.1", port, ae_title="CXR_AI")  # every slot held: transient
    assert full.is_rejected and full.acceptor.primitive.result == 2  # rejected-transient
    for s in silent[:5]:
        s.close()
    silent = silent[5:]
    time.sleep(0.3)
    for junk in (b"\x00" * 10, os.urandom(2000), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(junk)
            time.sleep(0.1)
    results: list[int] = []
    workers = [threading.Thread(target=lambda: results.append(echo_many(100)))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    for s in silent:
        s.close()
    assert sum(results) == 400  # 3 silent + 4 busy senders fit in max_associations=8
    time.sleep(4)  # network_timeout reaps idle connections
    threads, rss = _threads_and_rss()
    assert threads <= base_threads + 3, (base_threads, threads)
    assert rss - base_rss < 150_000, (base_rss, rss)  # kB
    f = write(make_image(), tmp_path / "after")
    assert storescu(port, [f]).returncode == 0


def test_calling_ae_beyond_its_share_rejected_transient_others_accepted(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "node", **{"dicom.max_associations": 8,
                                                    "dicom.max_associations_per_calling_ae": 2})
    n = start_node(settings, lambda s: FakeAnalyzer())
    held = []
    try:
        def associate(calling: str):  # type: ignore[no-untyped-def]
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            return ae.associate("127.0.0.1", settings.dicom.port, ae_title="CXR_AI")

        held = [associate("BUSY_PACS") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = associate("BUSY_PACS")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, limit
        other = associate("OTHER_PACS")
        assert other.is_established  # another peer still gets a slot
        assert int(other.send_c_echo().Status) == 0
        other.release()
        held[0].release()  # a slot of BUSY_PACS frees: it is accepted again
        again = associate("BUSY_PACS")
        assert again.is_established
        held[0] = again
        rows = query(settings, select(db.audit_events))
        [rejected] = [r for r in rows if r.kind == "association_rejected"]
        assert rejected.actor == "BUSY_PACS" and rejected.peer.startswith("127.0.0.1:")
        assert "rejected transient" in rejected.detail
        assert "max_associations_per_calling_ae" in rejected.detail
        assert "called AE CXR_AI" in rejected.detail
        accepted = [r.actor for r in rows if r.kind == "association_accepted"]
        assert sorted(accepted) == ["BUSY_PACS"] * 3 + ["OTHER_PACS"]
    finally:
        for a in held:
            a.release()
        n.stop()
