"""The pynetdicom internals dicom_node.transport relies on, and what it does with them.

The first tests read pynetdicom's source: they fail when an upgrade changes what the
transport hooks into, before a hostile peer finds out. The others run a guarded server and
a plain one in the same process over loopback.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until
from helpers.dicomfiles import make_image
from pynetdicom import AE, dimse, dimse_messages, evt, service_class
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from dicom_node import transport
from dicom_node.association_guard import AssociationGuard, GuardLimits


def test_pynetdicom_reads_a_pdu_header_then_its_body_through_the_socket() -> None:
    src = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in src and "self.socket.recv(pdu_length)" in src
    assert "_create_association" in inspect.getsource(RequestHandler.handle)
    assert "AssociationSocket(assoc, client_socket=self.request)" in inspect.getsource(
        RequestHandler._create_association)


def test_pynetdicom_streams_a_received_data_set_where_transport_points_it() -> None:
    src = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "_config.STORE_RECV_CHUNKED_DATASET" in src
    assert "NamedTemporaryFile(" in src and "self._data_set_file.write(data[1:])" in src
    assert "self.message = DIMSEMessage()" in inspect.getsource(
        dimse.DIMSEServiceProvider.receive_primitive)
    # complete data sets: pynetdicom removes the file after the handler (ours moved it)
    assert "os.unlink(req._dataset_file.name)" in inspect.getsource(
        service_class.StorageServiceClass.SCP)
    transport.install()
    assert isinstance(dimse_messages._config, transport._ChunkedReceiveConfig)
    assert dimse_messages.NamedTemporaryFile is transport._spool_tempfile


def _limits(**kw: Any) -> GuardLimits:
    values = dict(max_pdu_bytes=16384, max_instance_bytes=10_000_000, negotiation_timeout_s=10,
                  deadline_s=60, min_rate_bps=0, rate_window_s=5, per_calling_ae=4)
    values.update(kw)
    return GuardLimits(**values)  # type: ignore[arg-type]


def _send(port: int, ds: Any) -> int:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_guarded_server_streams_into_its_tmp_dir_plain_server_unchanged(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def guarded_store(event: Any) -> int:
        path = Path(event.request._dataset_path)
        seen["guarded"] = (path.parent, path.read_bytes()[128:132])
        return 0

    def plain_store(event: Any) -> int:
        seen["plain"] = (event.request._dataset_path, len(event.request.DataSet.getvalue()))
        return 0

    scp = AE(ae_title="SCP")
    scp.add_supported_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    guard = AssociationGuard(_limits(), None)
    guarded = transport.start_guarded_server(
        scp, ("127.0.0.1", free_port()), evt_handlers=[(evt.EVT_C_STORE, guarded_store),
                                                       *guard.handlers()],
        guard=guard, tmp_dir=tmp_path)
    plain = scp.start_server(("127.0.0.1", free_port()), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, plain_store)])
    try:
        ds = make_image(rows=64, cols=64)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        assert _send(guarded.server_address[1], ds) == 0
        assert _send(plain.server_address[1], ds) == 0
    finally:
        guarded.shutdown()
        plain.shutdown()
    assert seen["guarded"] == (tmp_path, b"DICM")
    assert seen["plain"][0] is None and seen["plain"][1] > 64 * 64 * 2
    assert not list(tmp_path.iterdir())  # pynetdicom removed the complete file


def test_oversize_pdu_header_aborts_before_the_body_is_read(tmp_path: Path) -> None:
    from helpers.rawdicom import associate, pdata_header

    scp = AE(ae_title="CXR_AI")
    scp.add_supported_context("1.2.840.10008.1.1")
    guard = AssociationGuard(_limits(max_pdu_bytes=16384), None)
    server = transport.start_guarded_server(scp, ("127.0.0.1", free_port()),
                                            evt_handlers=guard.handlers(), guard=guard,
                                            tmp_dir=tmp_path)
    try:
        sock = associate(server.server_address[1], "PACS", "1.2.840.10008.1.1")
        flows = list(guard._flows.values())
        sock.sendall(pdata_header(16385) + b"\x00" * 100)
        reply = sock.recv(64)
        assert reply[:1] == b"\x07"  # A-ABORT, source 2 (provider), invalid PDU parameter
        assert reply[8:10] == b"\x02\x06"
        assert flows[0].aborted is not None and "16385 B" in flows[0].aborted
        assert flows[0].received < 6 + 16384  # the body was never read
        wait_until(lambda: not scp.active_associations, 5, what="association ended")
        sock.close()
    finally:
        server.shutdown()


def test_abort_connection_unblocks_a_read_stuck_mid_pdu(tmp_path: Path) -> None:
    from helpers.rawdicom import associate, pdata_header

    scp = AE(ae_title="CXR_AI")
    scp.add_supported_context("1.2.840.10008.1.1")
    guard = AssociationGuard(_limits(), None)
    server = transport.start_guarded_server(scp, ("127.0.0.1", free_port()),
                                            evt_handlers=guard.handlers(), guard=guard,
                                            tmp_dir=tmp_path)
    try:
        sock = associate(server.server_address[1], "PACS", "1.2.840.10008.1.1")
        sock.sendall(pdata_header(1000) + b"\x00" * 10)  # the DUL now waits in recv()
        [flow] = guard._flows.values()
        wait_until(lambda: flow.in_pdu, 5, what="PDU in progress")
        guard.abort(flow, "test")
        data = io.BytesIO()
        sock.settimeout(5)
        try:
            while chunk := sock.recv(100):
                data.write(chunk)
        except (TimeoutError, ConnectionError):
            pytest.fail("connection not closed by the abort")
        assert data.getvalue()[:1] == b"\x07"
        wait_until(lambda: not scp.active_associations, 5, what="association ended")
    finally:
        server.shutdown()


def test_pynetdicom_binds_itself_so_reuse_port_is_set_in_our_server_bind() -> None:
    """socketserver's ``allow_reuse_port`` is ignored: pynetdicom overrides ``server_bind``
    (SO_REUSEADDR, then bind), so GuardedAssociationServer sets SO_REUSEPORT before it."""
    from pynetdicom.transport import AssociationServer

    src = inspect.getsource(AssociationServer.server_bind)
    assert "self.socket.bind(self.server_address)" in src and "allow_reuse_port" not in src
    assert transport.GuardedAssociationServer.server_bind is not AssociationServer.server_bind
