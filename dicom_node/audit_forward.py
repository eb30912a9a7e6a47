"""Forwarding of the audit trail as RFC 5424 syslog messages (UDP, or TCP with RFC 6587
octet counting), driven by a cursor in the database.

Events wait in ``audit_events`` while syslog is down: the cursor (``audit_cursors``, name
``syslog``) only moves past an event once the socket has shown no error *after* it was
sent, i.e. on a later send or on the probe that ends each batch (a refused UDP port comes
back as ICMP "port unreachable", a closed TCP connection as EOF or reset). Delivery is
**at least once**: a crash between sending and moving the cursor, or a syslog server that
dies after accepting bytes it never processed, resends or loses what no protocol
acknowledgement could tell apart; UDP across a network that drops datagrams or ICMP can
lose messages silently (use TCP where that matters).

Message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`` with MSGID = the
event kind, structured data ``[audit@32473 id=".." outcome=".." actor=".." peer=".."
subject=".."]`` (32473 is the example enterprise number of RFC 5612) and MSG the detail
(UTF-8, with the BOM RFC 5424 asks for).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, update
from sqlalchemy import select as sql_select

from dicom_node.config import SyslogSettings
from dicom_node.store import db

logger = logging.getLogger(__name__)

CURSOR = "syslog"
BATCH = 200
SD_ID = "audit@32473"
MAX_UDP_BYTES = 2048
_SEVERITY = {"success": 6, "warning": 5, "failure": 4}  # informational, notice, warning
_BOM = "\ufeff"


def _ascii(value: str | None, limit: int) -> str:
    text = "".join(c for c in (value or "") if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def _sd_value(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_event(event: Any, *, facility: int, hostname: str, app_name: str,
                 procid: int | None = None) -> bytes:
    """One audit event as an RFC 5424 message (no framing)."""
    pri = facility * 8 + _SEVERITY.get(event.outcome, 5)
    params = [("id", event.id), ("outcome", event.outcome)] + [
        (k, getattr(event, k)) for k in ("actor", "peer", "subject")
        if getattr(event, k) is not None]
    sd = f"[{SD_ID} " + " ".join(f'{k}="{_sd_value(v)}"' for k, v in params) + "]"
    header = (f"<{pri}>1 {timestamp(event.at)} {_ascii(hostname, 255)} "
              f"{_ascii(app_name, 48)} {procid if procid is not None else os.getpid()} "
              f"{_ascii(event.kind, 32)} {sd}")
    msg = f" {_BOM}{event.detail}" if event.detail else ""
    return (header + msg).encode("utf-8")


class _Transport:
    """One socket to the syslog server: send framed messages, probe for a late error."""

    def __init__(self, settings: SyslogSettings, timeout: float = 5.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        s = self.settings
        kind = socket.SOCK_STREAM if s.protocol == "tcp" else socket.SOCK_DGRAM
        family, _, _, _, addr = socket.getaddrinfo(s.host, s.port, type=kind)[0]
        sock = socket.socket(family, kind)
        sock.settimeout(self.timeout)
        try:
            sock.connect(addr)  # UDP too: a refused port then raises on the next call
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, message: bytes) -> None:
        if self.sock is None:
            self.sock = self._connect()
        if self.settings.protocol == "tcp":
            self.sock.sendall(str(len(message)).encode() + b" " + message)
        else:
            self.sock.send(message[:MAX_UDP_BYTES])

    def probe(self, wait_s: float) -> None:
        """Raise if the server refused or closed since the last send."""
        if self.sock is None:
            return
        readable, _, _ = select.select([self.sock], [], [], wait_s)
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionRefusedError(error, os.strerror(error))
        if readable:
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            if self.settings.protocol == "tcp" and data == b"":
                raise ConnectionResetError("syslog server closed the connection")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SyslogForwarder:
    """Sends every audit event after the cursor, in id order; ``run_once`` per poll."""

    def __init__(self, engine: Engine, settings: SyslogSettings, *,
                 hostname: str | None = None, probe_s: float = 0.05) -> None:
        self.engine = engine
        self.settings = settings
        self.hostname = hostname or socket.gethostname()
        self.probe_s = probe_s
        self.transport = _Transport(settings)
        self._down_since: float | None = None

    def cursor(self) -> int:
        with db.reading(self.engine) as conn:
            row = conn.execute(sql_select(db.audit_cursors.c.last_id)
                               .where(db.audit_cursors.c.name == CURSOR)).first()
        return int(row.last_id) if row else 0

    def _advance(self, last_id: int) -> None:
        with self.engine.begin() as conn:
            values = {"last_id": last_id, "updated_at": time.time()}
            done = conn.execute(update(db.audit_cursors)
                                .where(db.audit_cursors.c.name == CURSOR).values(**values))
            if not done.rowcount:
                conn.execute(insert(db.audit_cursors).values(name=CURSOR, **values))

    def _pending(self, after: int) -> list[Any]:
        with db.reading(self.engine) as conn:
            return list(conn.execute(sql_select(db.audit_events)
                                     .where(db.audit_events.c.id > after)
                                     .order_by(db.audit_events.c.id).limit(BATCH)).all())

    def run_once(self) -> int:
        """Forward one batch; returns how many events were confirmed (0 while down)."""
        start = self.cursor()
        events = self._pending(start)
        if not events:
            return 0
        confirmed = start
        try:
            self.transport.probe(0)  # a connection the server closed since the last batch
            for i, event in enumerate(events):
                self.transport.send(format_event(
                    event, facility=self.settings.facility, hostname=self.hostname,
                    app_name=self.settings.app_name))
                if i:  # this send showed no error left by the previous one: confirmed
                    confirmed = events[i - 1].id
            self.transport.probe(self.probe_s)
            confirmed = events[-1].id
        except OSError as exc:
            self.transport.close()
            self._note_down(exc)
        else:
            self._note_up()
        if confirmed > start:
            self._advance(confirmed)
        return sum(1 for e in events if e.id <= confirmed)

    def _note_down(self, exc: OSError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("syslog %s:%d (%s) unreachable: %s; audit events wait in the "
                           "database", self.settings.host, self.settings.port,
                           self.settings.protocol, exc.strerror or exc)

    def _note_up(self) -> None:
        if self._down_since is not None:
            logger.info("syslog %s:%d reachable again after %.0f s", self.settings.host,
                        self.settings.port, time.monotonic() - self._down_since)
            self._down_since = None

    def close(self) -> None:
        self.transport.close()
