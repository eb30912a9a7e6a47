"""The DICOM listener: pynetdicom SCP for Verification and image Storage.

Only transfer syntaxes the node can decode are accepted at negotiation, so an image the
models cannot read is refused there rather than acknowledged and lost.

Receiving is bounded: the servers are :class:`dicom_node.transport.GuardedAssociationServer`
(PDU headers checked before their bodies are read; each data set streamed into the spool's
``tmp/`` as its fragments arrive, never held in memory) and one
:class:`dicom_node.association_guard.AssociationGuard`, shared by the plain and TLS
listeners, applies the size, time, rate and per-calling-AE limits and audits associations.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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

from dicom_node.association_guard import AssociationGuard, GuardLimits
from dicom_node.config import DicomSettings, TlsSettings
from dicom_node.delivery.commitment import CommitmentReports, add_report_context
from dicom_node.ingest import Ingestor, Received, ReceivedFile, StoreStatus
from dicom_node.net import set_nodelay
from dicom_node.receipts import Receipts
from dicom_node.store.transitions import release_studies
from dicom_node.transport import start_guarded_server

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


def handle_store(event: Any, ingestor: Ingestor, guard: AssociationGuard) -> int:
    """C-STORE: durable move + DB row, then the status. Never raises, never decodes."""
    try:
        flow = guard.flow(event.assoc)
        if flow is not None and flow.aborted is not None:  # the last PDU of an aborted one
            return int(StoreStatus.PROCESSING_FAILURE)
        req = event.request
        requestor = event.assoc.requestor
        common = dict(sop_class_uid=str(req.AffectedSOPClassUID),
                      sop_instance_uid=str(req.AffectedSOPInstanceUID),
                      transfer_syntax=str(event.context.transfer_syntax),
                      calling_ae=str(requestor.ae_title).strip()[:16],
                      peer=f"{requestor.address}:{requestor.port}")
        path = getattr(req, "_dataset_path", None)  # chunked receive (dicom_node.transport)
        if path is not None:  # with the tap of its writes, when it is a TappedFile
            fh = getattr(req, "_dataset_file", None)
            return int(ingestor.ingest_file(ReceivedFile(
                path=Path(path), tap=getattr(fh, "tap", None),
                announcement=getattr(fh, "announcement", None), **common)))
        return int(ingestor.ingest(Received(file_meta=event.file_meta,
                                            dataset_bytes=req.DataSet.getvalue(), **common)))
    except Exception:  # the edge: a status, never a dropped association
        logger.exception("C-STORE handler failed")
        return int(StoreStatus.PROCESSING_FAILURE)


def _log_event(event: Any) -> None:
    peer = event.assoc.requestor
    logger.warning("%s from %s:%s calling AE %r", event.event.name, peer.address, peer.port,
                str(peer.ae_title).strip())


def _log_receipts(event: Any, receipts: Receipts) -> None:
    """The connection ended: one INFO line per study it brought (dicom_node.receipts)."""
    peer = event.assoc.requestor
    receipts.close(f"{peer.address}:{peer.port}")


class GraceWakeup(Protocol):
    """Wakes the assembler at the end of a release's grace: a :class:`~dicom_node.wakeups.
    Wakeup` in one process, the pipe to the parent in a receiver process."""

    def set_after(self, delay_s: float) -> None: ...


@dataclass(frozen=True)
class StudyRelease:
    """Release-driven study completion (``studies.release_grace_s``): what a release needs."""

    grace_s: float
    assembler: GraceWakeup | None = None  # woken at the release and at the end of its grace


def _record_release(event: Any, ingestor: Ingestor, release: StudyRelease) -> None:
    """A-RELEASE (not an abort): the studies this association completes are marked released
    in the database (so a restart keeps it), and the assembler is woken for the end of the
    grace. Runs after the A-RELEASE-RP went out: the sender never waits for it."""
    peer = event.assoc.requestor
    study_uids = ingestor.receipts.release(f"{peer.address}:{peer.port}")
    if not study_uids:
        return
    try:
        with ingestor.engine.begin() as conn:
            marked = release_studies(conn, study_uids, time.time())
    except Exception:  # the edge: the quiet period still completes these studies
        logger.exception("recording the release of %d study(ies) failed", len(study_uids))
        return
    logger.debug("association released: %d of %d study(ies) complete after %.1f s of grace",
                 marked, len(study_uids), release.grace_s)
    if marked and release.assembler is not None:
        release.assembler.set_after(release.grace_s)


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
              commitment: CommitmentReports | None = None,
              release: StudyRelease | None = None,
              receiver: str | None = None) -> list[ThreadedAssociationServer]:
    """Start the listener(s) in background threads: plain, and TLS when configured.

    With ``release``, an association's release completes the studies it delivered.
    ``receiver`` names this process in the audit of its associations (owner id and pid).
    With ``settings.reuses_port`` the ports are bound with SO_REUSEPORT (shared with other
    receiver processes)."""
    ae = build_ae(settings)
    guard = AssociationGuard(GuardLimits.from_settings(
        settings, max_instance_bytes=ingestor.max_instance_bytes), ingestor.engine,
        receiver=receiver)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [ingestor, guard]),
        (evt.EVT_ABORTED, _log_event),
        (evt.EVT_CONN_CLOSE, _release_unused_slot),
        (evt.EVT_CONN_CLOSE, _log_receipts, [ingestor.receipts]),
        (evt.EVT_CONN_OPEN, set_nodelay),
        *([(evt.EVT_RELEASED, _record_release, [ingestor, release])] if release else []),
        *guard.handlers(),  # limits, watchdog feed, audit of accepted/rejected/aborted
        *(commitment.handlers if commitment else []),
    ]
    tmp_dir = ingestor.spool.tmp_dir  # received data sets stream here (same filesystem)
    announce = ingestor.writer.announce  # a data set starts: the group commit may wait for it
    reuse = settings.reuses_port
    servers = [start_guarded_server(ae, (settings.host, settings.port), evt_handlers=handlers,
                                    guard=guard, tmp_dir=tmp_dir, announce=announce,
                                    reuse_port=reuse)]
    logger.info("DICOM SCP %r listening on %s:%d", settings.ae_title, settings.host,
                settings.port)
    if settings.tls.enabled:
        servers.append(start_guarded_server(ae, (settings.host, settings.tls.port),
                                            evt_handlers=handlers, guard=guard,
                                            tmp_dir=tmp_dir, announce=announce,
                                            ssl_context=tls_context(settings.tls),
                                            reuse_port=reuse))
        logger.info("DICOM SCP %r listening with TLS on %s:%d", settings.ae_title,
                    settings.host, settings.tls.port)
    guard.start()
    return servers
