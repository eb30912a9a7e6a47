"""Real result objects (SR, SC, GSPS) with their delivery rows, made through the node's own
ingest -> study assembly -> worker path with the fake model, for driving the sender
directly (one ``run_once`` at a time, at a chosen clock)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from pydantic import TypeAdapter
from sqlalchemy import select

from dicom_node.config import AnyDestination, SelectionSettings, SenderSettings
from dicom_node.ingest import Ingestor
from dicom_node.jobs import JobQueue
from dicom_node.outputs import OutputSettings
from dicom_node.sender import Sender
from dicom_node.spool import Spool
from dicom_node.store import db
from dicom_node.studies import StudyAssembler
from dicom_node.worker import AnalysisWorker
from helpers.dicomfiles import make_image, received
from helpers.fakes import FakeAnalyzer

_DESTINATION: TypeAdapter[AnyDestination] = TypeAdapter(AnyDestination)
SENDER_DEFAULTS: dict[str, Any] = {"max_attempts": 3, "backoff_initial_s": 0.1,
                                   "backoff_max_s": 0.2, "timeout_s": 5,
                                   "commitment_wait_s": 2}


class ResultBench:
    def __init__(self, root: Path, destinations: list[dict[str, Any]],
                 output_settings: OutputSettings | None = None,
                 db_url: str | None = None) -> None:
        # C-STORE (no ``type``) or ``type: stow-rs`` mappings, validated as the config does
        self.destinations = [_DESTINATION.validate_python(d) for d in destinations]
        self.engine = db.make_engine(db_url or f"sqlite:///{root / 'node.db'}")
        self._senders: list[Sender] = []
        self.spool = Spool(root / "spool")
        self.ingestor = Ingestor(self.engine, self.spool, max_instance_bytes=50_000_000)
        self.assembler = StudyAssembler(self.engine, self.spool, SelectionSettings(), 0.0)
        self.worker = AnalysisWorker(self.engine, self.spool,
                                     JobQueue(self.engine, lease_s=60, max_attempts=1),
                                     FakeAnalyzer(), output_settings or OutputSettings(),
                                     self.destinations)

    def study(self, seed: int = 0) -> str:
        """One analysed study: its SR, SC and GSPS written, deliveries pending."""
        uid = pydicom.uid.generate_uid()
        self.ingestor.ingest(received(make_image(study_uid=uid, seed=seed)))
        self.assembler.run_once(time.time() + 1)
        outcome = self.worker.process_one("bench")
        assert outcome is not None and outcome.state == "done", outcome
        return uid

    def sender(self, calling_ae: str = "CXR_AI", **settings: Any) -> Sender:
        sender = Sender(self.engine, self.spool, self.destinations,
                        SenderSettings(**{**SENDER_DEFAULTS, **settings}), calling_ae, seed=1,
                        sc_syntax=self.worker.output_settings.sc_transfer_syntax)
        self._senders.append(sender)  # closed with the bench (STOW-RS HTTP sessions)
        return sender

    def deliveries(self, study_uid: str | None = None) -> dict[str, Any]:
        """Delivery rows (with the output's kind and UIDs) keyed by output kind; one
        destination and one study expected when keyed like this."""
        return {r.kind: r for r in self.rows(study_uid)}

    def rows(self, study_uid: str | None = None) -> list[Any]:
        d, o = db.deliveries.c, db.outputs.c
        q = (select(db.deliveries, o.kind, o.sop_instance_uid, o.sop_class_uid, o.path,
                    o.study_uid).join(db.outputs, o.id == d.output_id).order_by(d.id))
        if study_uid:
            q = q.where(o.study_uid == study_uid)
        with self.engine.connect() as conn:
            return list(conn.execute(q).all())

    def audit(self, kind: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(db.audit_events)
                                     .where(db.audit_events.c.kind == kind)
                                     .order_by(db.audit_events.c.id)).all())

    def close(self) -> None:
        for sender in self._senders:
            sender.close()
        self.engine.dispose()
