"""The DICOM listener: pynetdicom SCP for Verification and image Storage.

Only transfer syntaxes the node can decode are accepted at negotiation, so an image the
models cannot read is refused there rather than acknowledged and lost.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import DicomSettings, TlsSettings
from dicom_node.delivery.commitment import CommitmentReports, add_report_context
from dicom_node.ingest import Ingestor, Received, StoreStatus
from dicom_node.net import set_nodelay

logger = logging.getLogger(__name__)

ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]


def handle_store(event: Any, ingestor: Ingestor) -> int:
    """C-STORE: durable write + DB row, then the status. Never raises."""
    try:
        req = event.request
        rec = Received(
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            file_meta=event.file_meta,
            dataset_bytes=req.DataSet.getvalue(),
            calling_ae=str(event.assoc.requestor.ae_title).strip()[:16],
        )
        return int(ingestor.ingest(rec))
    except Exception:  # the edge: a status, never a dropped association
        logger.exception("C-STORE handler failed")
        return int(StoreStatus.PROCESSING_FAILURE)


def _log_event(event: Any) -> None:
    peer = event.assoc.requestor
    logger.info("%s from %s:%s calling AE %r", event.event.name, peer.address, peer.port,
                str(peer.ae_title).strip())


def _log_rejected(event: Any) -> None:
    peer = event.assoc.requestor
    logger.warning("association rejected (audit): from %s:%s calling AE %r called AE %r",
                   peer.address, peer.port, str(peer.ae_title).strip(),
                   str(event.assoc.acceptor.ae_title).strip())


def _release_unused_slot(event: Any) -> None:
    """A connection closed before any A-ASSOCIATE-RQ frees its association slot now.

    pynetdicom's acceptor otherwise waits the full ACSE timeout for a request that can no
    longer come, so bare TCP connects (port scans, load-balancer health checks) would hold
    ``max_associations`` slots and lock real senders out. An empty item on the DUL's user
    queue is what pynetdicom's own timeout path sees: the association ends at once.
    """
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for ctx in StoragePresentationContexts:
        ae.add_supported_context(ctx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    add_report_context(ae)  # storage commitment results from the destinations
    return ae


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Server context: TLS 1.2+, the node's certificate, client certificates verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    return ctx


def start_scp(settings: DicomSettings, ingestor: Ingestor,
              commitment: CommitmentReports | None = None) -> list[ThreadedAssociationServer]:
    """Start the listener(s) in background threads: plain, and TLS when configured."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [ingestor]),
        (evt.EVT_ACCEPTED, _log_event),
        (evt.EVT_REJECTED, _log_rejected),
        (evt.EVT_ABORTED, _log_event),
        (evt.EVT_CONN_CLOSE, _release_unused_slot),
        (evt.EVT_CONN_OPEN, set_nodelay),
        *(commitment.handlers if commitment else []),
    ]
    servers = [ae.start_server((settings.host, settings.port), block=False,
                               evt_handlers=handlers)]
    logger.info("DICOM SCP %r listening on %s:%d", settings.ae_title, settings.host,
                settings.port)
    if settings.tls.enabled:
        servers.append(ae.start_server((settings.host, settings.tls.port), block=False,
                                       evt_handlers=handlers,
                                       ssl_context=tls_context(settings.tls)))
        logger.info("DICOM SCP %r listening with TLS on %s:%d", settings.ae_title,
                    settings.host, settings.tls.port)
    return servers
