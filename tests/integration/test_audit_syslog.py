"""Audit events forwarded as RFC 5424 syslog to a real UDP / TCP server on loopback: while
the server is down the events wait in the database; once it is back every event arrives,
once, in order. The node wires the forwarder and records its start (config, node_started)."""

from __future__ import annotations

import re
import socket
import threading
from datetime import datetime
from pathlib import Path

import pytest
from conftest import free_port, wait_until
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, start_node
from sqlalchemy import Engine

from dicom_node.audit import AuditKind, Outcome, record_now
from dicom_node.audit_forward import SyslogForwarder
from dicom_node.config import SyslogSettings
from dicom_node.store import db

pytestmark = pytest.mark.integration

# RFC 5424: HEADER SP STRUCTURED-DATA [SP MSG]
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d))"
    r" (?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128})"
    r" (?P<msgid>[!-~]{1,32}) (?P<sd>-|(?:\[[^\]]*\])+)(?: (?P<msg>.*))?$", re.DOTALL)
SD_PARAM = re.compile(r'([!-~]{1,32}?)="((?:[^"\\\]]|\\["\\\]])*)"')


class SyslogServer:
    """A syslog receiver: UDP datagrams, or TCP with octet-counted frames (RFC 6587)."""

    def __init__(self, protocol: str, port: int) -> None:
        self.protocol, self.port = protocol, port
        self.messages: list[str] = []
        self._stop = threading.Event()
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        if protocol == "tcp":
            self.sock.listen()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.protocol == "udp":
                    self.messages.append(self.sock.recv(65535).decode("utf-8"))
                else:
                    conn, _ = self.sock.accept()
                    self.conns.append(conn)
                    threading.Thread(target=self._read, args=(conn,), daemon=True).start()
            except (TimeoutError, OSError):
                continue

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b" " in buf:
                length, rest = buf.split(b" ", 1)
                if len(rest) < int(length):
                    break
                self.messages.append(rest[:int(length)].decode("utf-8"))
                buf = rest[int(length):]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def _events(engine: Engine, first: int, n: int) -> list[int]:
    for i in range(first, first + n):
        record_now(engine, AuditKind.LOGIN_FAILED if i % 2 else AuditKind.INSTANCE_RECEIVED,
                   Outcome.FAILURE if i % 2 else Outcome.SUCCESS, actor=f"AE{i}",
                   peer="127.0.0.1:1234", subject=f"1.2.3.{i}",
                   detail=f'event {i} with "quotes" and ] and \\ and ü')
    return list(range(first, first + n))


def parse(message: str) -> dict[str, object]:
    m = RFC5424.match(message)
    assert m, message
    params = dict(SD_PARAM.findall(m["sd"]))
    return {**m.groupdict(), "params": params}


def ids(server: SyslogServer) -> list[int]:
    return [int(parse(m)["params"]["id"]) for m in server.messages]  # type: ignore[index]


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_events_wait_while_syslog_is_down_then_arrive_once(tmp_path: Path,
                                                           protocol: str) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    port = free_port()
    fwd = SyslogForwarder(engine, SyslogSettings(enabled=True, port=port, protocol=protocol,
                                                 facility=10, app_name="cxr-ai-node"),
                          hostname="node-host")
    try:
        _events(engine, 1, 5)
        assert fwd.run_once() == 0 and fwd.run_once() == 0  # down: nothing confirmed
        assert fwd.cursor() == 0
        server = SyslogServer(protocol, port)
        wait_until(lambda: fwd.run_once() == 5, 10, what="first batch forwarded")
        wait_until(lambda: len(server.messages) >= 5, 10, what="first batch received")
        assert fwd.run_once() == 0 and fwd.cursor() == 5
        server.stop()  # down again (for TCP: the connection the forwarder holds closes)
        _events(engine, 6, 3)
        assert fwd.run_once() == 0 and fwd.run_once() == 0 and fwd.cursor() == 5
        server2 = SyslogServer(protocol, port)
        wait_until(lambda: fwd.run_once() == 3, 10, what="second batch forwarded")
        wait_until(lambda: len(server2.messages) >= 3, 10, what="second batch received")
        assert fwd.run_once() == 0
        server2.stop()
        assert ids(server) + ids(server2) == list(range(1, 9))  # each once, in order
        check_format(server.messages[0], event_id=1)
        check_format(server.messages[1], event_id=2)
    finally:
        fwd.close()
        engine.dispose()


def check_format(message: str, event_id: int) -> None:
    p = parse(message)
    failure = event_id % 2 == 1
    assert int(p["pri"]) == 10 * 8 + (4 if failure else 6)  # authpriv.warning / .info
    datetime.fromisoformat(str(p["ts"]).replace("Z", "+00:00"))
    assert (p["host"], p["app"]) == ("node-host", "cxr-ai-node")
    assert str(p["procid"]).isdigit()
    assert p["msgid"] == ("login_failed" if failure else "instance_received")
    assert str(p["sd"]).startswith("[audit@32473 ")
    assert p["params"] == {"id": str(event_id), "outcome": "failure" if failure else "success",
                           "actor": f"AE{event_id}", "peer": "127.0.0.1:1234",
                           "subject": f"1.2.3.{event_id}"}
    assert p["msg"] == f'\ufeffevent {event_id} with "quotes" and ] and \\ and ü'


def test_node_forwards_its_own_start(tmp_path: Path) -> None:
    port = free_port()
    server = SyslogServer("tcp", port)
    settings = node_settings(tmp_path / "node", **{
        "audit.syslog.enabled": True, "audit.syslog.port": port,
        "audit.syslog.protocol": "tcp", "audit.syslog.poll_interval_s": 0.1,
        "web.token": "t" * 32})
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        wait_until(lambda: len(server.messages) >= 2, 15, what="start events forwarded")
    finally:
        node.stop()
        server.stop()
    loaded, started = (parse(m) for m in server.messages[:2])
    assert loaded["msgid"] == "config_loaded" and started["msgid"] == "node_started"
    detail = str(loaded["msg"])
    assert f"dicom CXR_AI@127.0.0.1:{settings.dicom.port}" in detail
    assert "syslog tcp" in detail and "t" * 32 not in detail  # no secret in the summary
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            kinds = [r.kind for r in conn.execute(db.audit_events.select()
                                                  .order_by(db.audit_events.c.id))]
    finally:
        engine.dispose()
    assert kinds[:2] == ["config_loaded", "node_started"] and kinds[-1] == "node_stopped"
