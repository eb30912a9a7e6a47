"""The listener's transport: pynetdicom's association server, with reads bounded as the
bytes arrive and received data sets streamed into the spool.

This is the one module that relies on pynetdicom internals (verified with pynetdicom 3.0.4);
``tests/unit/dicom_node/test_transport.py`` fails when one of them changes:

1. ``DULServiceProvider._read_pdu_data`` reads a PDU as ``socket.recv(6)`` (type, length)
   and then ``socket.recv(length)``, buffering the whole PDU before anything looks at it.
   :class:`BoundedAssociationSocket` replaces ``recv``: it sees the header first, so a PDU
   declaring more than we announced is never read (the association is aborted at once),
   and it reports every chunk to the association's :class:`FlowObserver` (the watchdog's
   byte counts, mid-PDU included).
2. ``RequestHandler._create_association`` builds the acceptor's ``AssociationSocket``;
   :class:`GuardedRequestHandler` changes its class to :class:`BoundedAssociationSocket`.
3. ``dimse_messages`` reads ``_config.STORE_RECV_CHUNKED_DATASET`` when a C-STORE-RQ data
   set starts and then writes it to ``NamedTemporaryFile(delete=False)`` fragment by
   fragment, through its ``write`` only (preamble, file meta, fragments), and hands it to
   the handler as ``C_STORE._dataset_file``. :func:`install` replaces both names in that
   module's namespace: chunked receive is on for the associations of a
   :class:`GuardedAssociationServer` only (other SCPs in the process keep pynetdicom's
   default) and the file is created in that server's spool ``tmp/``, the spool's own
   filesystem, so accepting it is a rename; it is a :class:`TappedFile`, whose tap keeps
   the first bytes and the hash of what was written.
4. A partial data set of an aborted association stays in ``DIMSEServiceProvider.message``;
   :func:`discard_partial_dataset` removes its file (pynetdicom removes only complete ones).

Also here, because it needs the server's accept path: the TLS handshake is moved from the
accept loop (where one silent client blocks every other TLS connection) into the
connection's own thread, bounded by the ACSE timeout.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import _config, dimse_messages
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.spool import start_writeback
from dicom_node.tap import Tap

logger = logging.getLogger(__name__)

_RECV_CHUNK = 64 * 1024
# a data set in transfer is handed to the disk's writeback every this many bytes (see
# TappedFile), so the fsync before its ACK waits for the last few MB only
WRITEBACK_BYTES = 4 * 1024 * 1024
_PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ .. A-ABORT


class FlowObserver(Protocol):
    """What the transport reports about one association (see association_guard.Flow)."""

    def pdu_header(self, pdu_type: int, length: int) -> None:
        """A PDU header was read; may abort the association (it is not read further)."""

    def bytes_received(self, n: int) -> None: ...

    def pdu_done(self) -> None: ...


class BoundedAssociationSocket(AssociationSocket):
    """The acceptor's socket: PDU headers checked before their bodies are read."""

    flow: FlowObserver
    _expect_header: bool

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        out = bytearray()
        while sock is not None and len(out) < nr_bytes:
            chunk = sock.recv(min(_RECV_CHUNK, nr_bytes - len(out)))
            if not chunk:  # closed (or shut down by an abort): pynetdicom sees it short
                break
            out += chunk
            self.flow.bytes_received(len(chunk))
        if not self._expect_header:  # the body of the PDU whose header came last
            self._expect_header = True
            self.flow.pdu_done()
        elif len(out) == 6 and out[0] in _PDU_TYPES:
            self._expect_header = False
            self.flow.pdu_header(out[0], int.from_bytes(out[2:6], "big"))
        return out


def abort_connection(assoc: Association, *, source: int = 0x00, reason: int = 0x00,
                     send_abort_pdu: bool = True) -> None:
    """Send an A-ABORT PDU (best effort, never blocking) and shut the connection down.

    Works whatever the association's DUL thread is doing, blocked in a read included: the
    read returns, pynetdicom sees the transport close (Evt17) and ends the association. On
    TLS no A-ABORT is written: an SSL socket cannot be written from a second thread.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is None:
        return
    if send_abort_pdu and not isinstance(sock, ssl.SSLSocket):
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = source, reason
        try:
            sock.send(pdu.encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass  # the peer's window is full or it is gone: the shutdown still ends it
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket.shutdown: no unwrap
    except OSError:
        pass


def discard_partial_dataset(assoc: Association) -> None:
    """Remove the temporary file of a data set whose transfer will never finish."""
    message = getattr(assoc.dimse, "message", None)
    fh = getattr(message, "_data_set_file", None)
    if fh is None:
        return
    message._data_set_file = None  # type: ignore[union-attr]
    try:
        fh.close()
    finally:
        Path(fh.name).unlink(missing_ok=True)
    logger.info("removed the partial data set of an association that ended mid-transfer")


class GuardedRequestHandler(RequestHandler):
    """One accepted connection: TLS handshake here, then pynetdicom's association."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        if self._tls_handshake():
            super().handle()

    def _tls_handshake(self) -> bool:
        sock = self.request
        if not isinstance(sock, ssl.SSLSocket):
            return True
        before = sock.gettimeout()
        try:
            sock.settimeout(self.server.handshake_timeout_s)
            sock.do_handshake()
            sock.settimeout(before)
            return True
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            self.server.guard.tls_failed(self.client_address, exc)
            self.server.shutdown_request(sock)
            return False

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        sock.__class__ = BoundedAssociationSocket
        sock._expect_header = True
        sock.flow = self.server.guard.open(assoc)
        return assoc


class _Guard(Protocol):
    def open(self, assoc: Association) -> FlowObserver: ...

    def tls_failed(self, client_address: Any, exc: OSError) -> None: ...

    def stop(self) -> None: ...


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with bounded reads, chunked receive into ``tmp_dir``."""

    def __init__(self, ae: ApplicationEntity, address: tuple[str, int], ae_title: str,
                 contexts: list[Any], ssl_context: ssl.SSLContext | None = None,
                 evt_handlers: list[Any] | None = None, *, guard: _Guard, tmp_dir: Path,
                 handshake_timeout_s: float,
                 announce: Callable[[], Announcement] | None = None,
                 reuse_port: bool = False) -> None:
        self.guard = guard
        self.reuse_port = reuse_port  # SO_REUSEPORT: other processes may bind the port too
        self.tmp_dir = Path(tmp_dir)
        self.announce = announce  # called as each C-STORE data set starts to arrive
        self.handshake_timeout_s = handshake_timeout_s
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=GuardedRequestHandler)

    def server_bind(self) -> None:
        """pynetdicom's bind (it ignores socketserver's ``allow_reuse_port``), with
        SO_REUSEPORT set first when asked: then several processes listen on one port and
        Linux spreads the connections over them. A port in use says so and how to share it."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            super().server_bind()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            host, port = self.server_address[:2]
            share = ("the process listening there does not set it too" if self.reuse_port
                     else "several receivers on one port need dicom.reuse_port: true in "
                     "each of them")
            raise OSError(exc.errno, f"DICOM port {host}:{port} is already in use by another "
                          f"process ({share})") from exc

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        if self.ssl_context:  # handshake in the connection's thread (GuardedRequestHandler)
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def shutdown(self) -> None:
        super().shutdown()
        self.guard.stop()


def start_guarded_server(ae: ApplicationEntity, address: tuple[str, int], *,
                         evt_handlers: list[Any], guard: _Guard, tmp_dir: Path,
                         ssl_context: ssl.SSLContext | None = None,
                         announce: Callable[[], Announcement] | None = None,
                         reuse_port: bool = False) -> GuardedAssociationServer:
    """``ae.start_server(..., block=False)`` with a :class:`GuardedAssociationServer`."""
    install()
    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context,
                            server_class=GuardedAssociationServer, guard=guard,
                            tmp_dir=tmp_dir, handshake_timeout_s=ae.acse_timeout or 30.0,
                            announce=announce, reuse_port=reuse_port)
    assert isinstance(server, GuardedAssociationServer)
    threading.Thread(target=server.serve_forever, daemon=True,
                     name=f"AcceptorServer@{address[1]}").start()
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
    return server


def _guarded_server() -> GuardedAssociationServer | None:
    """The guarded server of the association whose DUL thread is running, if any."""
    dul = threading.current_thread()
    if not isinstance(dul, DULServiceProvider):
        return None
    server = getattr(dul.assoc, "_server", None)
    return server if isinstance(server, GuardedAssociationServer) else None


class _ChunkedReceiveConfig:
    """``pynetdicom._config`` as ``dimse_messages`` sees it: chunked receive per server."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_config, name)

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # noqa: N802 - pynetdicom's name
        return _guarded_server() is not None or _config.STORE_RECV_CHUNKED_DATASET


class Announcement(Protocol):
    """What the server's ``announce`` returns (see dicom_node.store.group_commit)."""

    def withdraw(self) -> None: ...


class TappedFile:
    """pynetdicom's temporary data set file, with every write fed to a :class:`Tap` too:
    ingest parses the header from the tap's first bytes and takes the sha256 from it, so
    the file just written is not read back (``C_STORE._dataset_file.tap``).

    ``announcement``: made when the data set started to arrive (the group commit may wait
    for its row); the C-STORE handler withdraws it when it submits, and closing (pynetdicom
    after the handler, :func:`discard_partial_dataset` on an abort) or dropping the file
    withdraws it too, so an association that dies never leaves one behind.

    Every :data:`WRITEBACK_BYTES` written, the kernel is asked to start writing them to disk
    (:func:`dicom_node.spool.start_writeback`): the fsync before the ACK then waits for the
    tail of a large data set only (18 MB DX: about 10 ms -> 1 ms, measured). Closing ends the
    tap's hashing thread, if a large data set started one.
    """

    def __init__(self, fh: Any, announcement: Announcement | None = None) -> None:
        self._fh = fh
        self.tap = Tap()
        self.announcement = announcement
        self._writeback_from = 0  # bytes before this are handed to the disk already
        if announcement is not None:
            weakref.finalize(self, announcement.withdraw)

    def write(self, data: bytes) -> int:
        self.tap.feed(data)
        written = self._fh.write(data)
        pending = self.tap.size - self._writeback_from
        if pending >= WRITEBACK_BYTES:
            self._fh.flush()
            start_writeback(self._fh.fileno(), self._writeback_from, pending)
            self._writeback_from = self.tap.size
        return written  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.announcement is not None:
            self.announcement.withdraw()
        self.tap.close()
        self._fh.close()

    def __getattr__(self, name: str) -> Any:  # name, file, ...
        return getattr(self._fh, name)


def _spool_tempfile(*args: Any, **kwargs: Any) -> Any:
    server = _guarded_server()
    if server is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - closed by pynetdicom
    kwargs["dir"] = server.tmp_dir
    return TappedFile(tempfile.NamedTemporaryFile(*args, **kwargs),  # noqa: SIM115 - as above
                      server.announce() if server.announce is not None else None)


def install() -> None:
    """Point ``dimse_messages`` at the per-server config and temp files (idempotent)."""
    if not isinstance(dimse_messages._config, _ChunkedReceiveConfig):
        dimse_messages._config = _ChunkedReceiveConfig()  # type: ignore[assignment]
        dimse_messages.NamedTemporaryFile = _spool_tempfile  # type: ignore[attr-defined]
