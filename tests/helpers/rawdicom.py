"""Hand-built DICOM Upper Layer PDUs, for peers that misbehave on purpose (raw sockets)."""

from __future__ import annotations

import io
import select
import socket

from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def associate_rq(calling: str, called: str, abstract_syntax: str,
                 transfer_syntax: str = EXPLICIT_LE, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (ID 1)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    cx = build_context(abstract_syntax, [transfer_syntax])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def pdata(payload: bytes, *, command: bool, last: bool, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU carrying one PDV."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    item = bytes([context_id, control]) + payload
    body = len(item).to_bytes(4, "big") + item
    return b"\x04\x00" + len(body).to_bytes(4, "big") + body


def pdata_header(declared_length: int) -> bytes:
    """Just the 6-byte header of a P-DATA-TF PDU declaring ``declared_length``."""
    return b"\x04\x00" + declared_length.to_bytes(4, "big")


def c_store_command(sop_instance_uid: str, message_id: int = 1) -> bytes:
    """The command set of a C-STORE-RQ (a data set follows), as one P-DATA-TF."""
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 0
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CR_STORAGE, sop_instance_uid
    req.DataSet = io.BytesIO(b"\x00")  # marks "data set present"
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return pdata(encode(msg.command_set, True, True), command=True, last=True)


def c_echo_command(message_id: int) -> bytes:
    req = C_ECHO()
    req.MessageID, req.AffectedSOPClassUID = message_id, VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return pdata(encode(msg.command_set, True, True), command=True, last=True)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole PDU (raises ConnectionError when the peer closes first)."""
    sock.settimeout(timeout)
    head = _read_exactly(sock, 6)
    return head + _read_exactly(sock, int.from_bytes(head[2:6], "big"))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} B")
        out += chunk
    return bytes(out)


def associate(port: int, calling: str, abstract_syntax: str, *, called: str = "CXR_AI",
              max_pdu: int = 16384) -> socket.socket:
    """Connect and negotiate; returns the socket once the A-ASSOCIATE-AC arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(calling, called, abstract_syntax, max_pdu=max_pdu))
    reply = read_pdu(sock)
    if reply[0] != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted: PDU type 0x{reply[0]:02X}")
    return sock


def closed_or_aborted(sock: socket.socket) -> bool:
    """True once the peer closed the connection or sent an A-ABORT (drains other PDUs)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            data = sock.recv(65536)
        except OSError:
            return True
        if not data or b"\x07\x00\x00\x00\x00\x04" in data:
            return True
    return False
