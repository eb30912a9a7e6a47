"""Bounded receiving against a real node process (QUALITY 23, 24): a deflate bomb, a PDU
declaring 2 GiB, an instance over the size limit and two trickling peers, each while the
node's memory is read from /proc. The model side is faked (tests/helpers/fake_node.py) so
the figures are the receiver's; they are printed for the closing note (run with -s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import storescu, wait_for_port, wait_until
from helpers.deflate import bomb_image, deflated_body, part10
from helpers.dicomfiles import make_image, write
from helpers.hostile import MAX_PDU, Trickler, reset_peak, status_kib
from helpers.node import node_settings, query, spawn_fake_node, write_config
from helpers.rawdicom import (
    CR_STORAGE,
    VERIFICATION,
    associate,
    c_echo_command,
    c_store_command,
    closed_or_aborted,
    pdata,
    pdata_header,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
MAX_INSTANCE = 4 * MiB
# Bounds on the receiver's RSS growth. The bomb inflates to 300 MiB; the node keeps a 4 MiB
# header prefix, one 1 MiB inflate step and zlib's window, and pydicom parses only that
# prefix: 64 MiB leaves room for allocator slack and thread stacks, yet is a fifth of what
# inflating the data set would cost. A PDU or instance over its limit costs at most one PDU
# (64 KiB here) plus socket buffers: 32 MiB.
BOMB_RSS_BOUND = 64 * MiB
STREAM_RSS_BOUND = 32 * MiB


@dataclass
class Receiver:
    settings: Settings
    pid: int
    log: Path

    @property
    def port(self) -> int:
        return self.settings.dicom.port

    def audit(self, kind: str, actor: str | None = None) -> list[Any]:
        rows = query(self.settings, select(db.audit_events).where(db.audit_events.c.kind == kind))
        return [r for r in rows if actor is None or r.actor == actor]

    def measure(self, what: str, attack: Callable[[], Any]) -> tuple[Any, int]:
        """Run ``attack``; returns its result and the peak RSS growth (bytes) meanwhile."""
        base = status_kib(self.pid, "VmRSS")
        hwm_reset = reset_peak(self.pid)
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], status_kib(self.pid, "VmRSS"))
                done.wait(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = attack()
        finally:
            time.sleep(0.3)  # let the node finish what the attack started
            done.set()
            sampler.join()
        top = max(peak[0], status_kib(self.pid, "VmHWM") if hwm_reset else 0)
        print(f"\n[RSS] {what}: baseline {base / 1024:.1f} MiB, peak {top / 1024:.1f} MiB, "
              f"growth {(top - base) / 1024:.1f} MiB (VmHWM reset: {hwm_reset})")
        return result, (top - base) * 1024


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    tmp = tmp_path_factory.mktemp("receiver")
    settings = node_settings(tmp / "node", quiet=0.3, **{
        "dicom.maximum_pdu_size": MAX_PDU, "dicom.max_associations": 2,
        "dicom.network_timeout_s": 3, "dicom.acse_timeout_s": 5,
        "dicom.association_deadline_s": 10, "dicom.min_transfer_rate_bps": 4096,
        "dicom.transfer_rate_window_s": 2, "storage.max_instance_bytes": MAX_INSTANCE,
        "storage.max_inflated_bytes": 128 * MiB})
    log = tmp / "node.log"
    proc = spawn_fake_node(write_config(settings, tmp / "node.yaml"), log)
    try:
        wait_for_port(settings.dicom.port, timeout=60)
        warm = [write(make_image(seed=i), tmp / "warm") for i in range(3)]
        assert storescu(settings.dicom.port, warm).returncode == 0
        # the warm study analysed and its outputs built, so every code path (and its imports)
        # is loaded before any test takes its RSS baseline
        studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                   for f in warm}
        wait_until(lambda: {(j.study_uid, j.state) for j in query(settings, select(db.jobs))}
                   == {(uid, "done") for uid in studies}, 60, what="warm-up studies analysed")
        yield Receiver(settings, proc.pid, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except Exception:  # noqa: BLE001 - teardown: make sure it is gone
            proc.kill()
            proc.wait()


def _still_serves(receiver: Receiver, folder: Path) -> None:
    f = write(make_image(), folder)
    res = storescu(receiver.port, [f])
    assert res.returncode == 0, res.stderr


def _spool(receiver: Receiver, sub: str) -> list[Path]:
    return [p for p in (receiver.settings.storage.data_dir / "spool" / sub).rglob("*")
            if p.is_file()]


def test_deflate_bomb_refused_with_bounded_rss(receiver: Receiver, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ds = bomb_image(12800, 12288)
    body = deflated_body(ds, zero_pixels=12800 * 12288 * 2)  # 300 MiB of pixels inflated
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(part10(ds, body))
    print(f"\n[bomb] {len(body) / 1024:.0f} KiB deflated, {12800 * 12288 * 2 / MiB:.0f} MiB "
          "of pixel data inflated")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as-is

    def attack() -> int:
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(CR_STORAGE, DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXR_AI")
        assert assoc.is_established
        status = assoc.send_c_store(bomb)
        assoc.release()
        return int(status.Status)

    status, growth = receiver.measure("deflate bomb (299 KiB -> 300 MiB)", attack)
    assert status == 0xC100  # StoreStatus.INFLATED_TOO_LARGE
    assert growth < BOMB_RSS_BOUND
    uid = str(ds.SOPInstanceUID)
    [q] = [r for r in query(receiver.settings, select(db.quarantine))
           if r.sop_instance_uid == uid]
    assert "inflates beyond 134217728 B" in q.reason
    assert not [r for r in query(receiver.settings, select(db.instances))
                if r.sop_instance_uid == uid]
    [audit] = [r for r in receiver.audit("instance_quarantined", "BOMBER")]
    assert audit.subject == uid and "0xC100" in audit.detail
    _still_serves(receiver, tmp_path / "after")


def test_pdu_declaring_2_gib_aborted_at_once(receiver: Receiver, tmp_path: Path) -> None:
    def attack() -> float:
        sock = associate(receiver.port, "RAWPEER", VERIFICATION, max_pdu=MAX_PDU)
        started = time.monotonic()
        try:
            sock.sendall(pdata_header(2**31))
            for _ in range(256):  # 16 MiB of the promised 2 GiB, as fast as it goes
                sock.sendall(bytes(65536))
        except OSError:
            pass  # the node closed the connection: what we want
        wait_until(lambda: closed_or_aborted(sock), 5, what="connection aborted")
        sock.close()
        return time.monotonic() - started

    elapsed, growth = receiver.measure("P-DATA-TF declaring 2 GiB", attack)
    assert elapsed < 5
    assert growth < STREAM_RSS_BOUND
    [audit] = receiver.audit("association_aborted", "RAWPEER")
    assert "declares 2147483648 B" in audit.detail and audit.peer.startswith("127.0.0.1:")
    _still_serves(receiver, tmp_path / "after")


def test_instance_over_the_limit_aborted_while_it_arrives(receiver: Receiver,
                                                          tmp_path: Path) -> None:
    big = make_image(rows=3500, cols=3500, seed=7)  # 24.5 MB, six times the limit
    path = write(big, tmp_path / "big")
    res, growth = receiver.measure("24.5 MB instance, limit 4 MiB",
                                   lambda: storescu(receiver.port, [path], calling="BIGSENDER"))
    assert res.returncode != 0 or "abort" in (res.stdout + res.stderr).lower()
    assert growth < STREAM_RSS_BOUND
    [audit] = receiver.audit("association_aborted", "BIGSENDER")
    read = int(audit.detail.split("data set passed ")[1].split(" B")[0])
    print(f"\n[instance limit] aborted after {read} B of data set (limit {MAX_INSTANCE} B)")
    assert MAX_INSTANCE < read <= MAX_INSTANCE + 2 * MAX_PDU  # bytes read ~ limit + one PDU
    uid = str(big.SOPInstanceUID)
    assert not [r for r in query(receiver.settings, select(db.instances))
                if r.sop_instance_uid == uid]
    wait_until(lambda: not _spool(receiver, "tmp"), 5, what="partial data set removed")
    _still_serves(receiver, tmp_path / "after")


def test_trickling_peers_aborted_while_a_pacs_is_served(receiver: Receiver,
                                                        tmp_path: Path) -> None:
    """network_timeout 3 s, each trickler sends every 2.5 s: pynetdicom alone keeps both for
    ever and, with max_associations 2, rejects everyone else for as long as they trickle."""
    study = pydicom.uid.generate_uid()
    files = [write(make_image(study_uid=study, seed=20 + i), tmp_path / "study") for i in range(4)]
    data = Trickler(receiver.port, "TRICKLE_DATA", c_store_command(pydicom.uid.generate_uid()),
                    lambda n: pdata(bytes(64), command=False, last=False), CR_STORAGE)
    echo = Trickler(receiver.port, "TRICKLE_ECHO", None, lambda n: c_echo_command(n + 1),
                    VERIFICATION)

    def attack() -> tuple[float, int]:
        for t in (data, echo):
            t.start()
            assert t.connected.wait(10)
        started, attempts = time.monotonic(), 0
        while time.monotonic() - started < 20:  # a PACS retrying a transient rejection
            attempts += 1
            res = storescu(receiver.port, files, calling="PACS", timeout=15)
            if res.returncode == 0:
                return time.monotonic() - started, attempts
            time.sleep(0.5)
        pytest.fail(f"the PACS was never served: {res.stderr[-500:]}")

    (served_after, attempts), growth = receiver.measure("two trickling peers + storescu",
                                                        attack)
    print(f"\n[trickle] PACS served after {served_after:.1f} s ({attempts} attempts); ")
    assert served_after < 8
    wait_until(lambda: data.lasted is not None and echo.lasted is not None, 20,
               what="both tricklers cut off")
    print(f"[trickle] data trickler cut after {data.lasted:.1f} s, echo trickler after "
          f"{echo.lasted:.1f} s")
    assert data.lasted is not None and data.lasted < 7  # min rate over a 2 s window
    assert echo.lasted is not None and 9 < echo.lasted < 14  # the 10 s deadline
    assert echo.sent >= 3  # it did keep the association busy under the network timeout
    [slow] = receiver.audit("association_aborted", "TRICKLE_DATA")
    assert "below dicom.min_transfer_rate_bps" in slow.detail
    [old] = receiver.audit("association_aborted", "TRICKLE_ECHO")
    assert "association_deadline_s" in old.detail
    stored = {r.sop_instance_uid for r in query(receiver.settings, select(db.instances))
              if r.study_uid == study}
    assert len(stored) == 4
    assert growth < STREAM_RSS_BOUND
    wait_until(lambda: not _spool(receiver, "tmp"), 5, what="trickled partial removed")
