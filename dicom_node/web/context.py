"""What the web app works with: settings, database, spool, the running node (optional) and
the evaluation service (optional), bundled once in the app factory and reached through
:func:`web_context` inside requests."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flask import current_app
from sqlalchemy import Engine

from dicom_node.config import Settings
from dicom_node.spool import Spool

if TYPE_CHECKING:
    from dicom_node.studies import StudyAssembler

EXTENSION_KEY = "cxr_node"


class EvaluationService(Protocol):
    """What the web layer needs from the evaluation jobs (``dicom_node.evaluation``)."""

    def trigger_run(self, job_name: str) -> int: ...

    def post_confirmed_labels(self, key_kind: str, key_uid: str,
                              labels: Mapping[str, int]) -> int: ...


@dataclass
class WebContext:
    settings: Settings
    engine: Engine
    spool: Spool
    token: str
    node: Any | None = None  # dicom_node.service.Node (not imported: keeps the app light)
    evaluation: EvaluationService | None = None
    render_lock: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2))  # bounded decode memory

    @property
    def thumbs_dir(self) -> Path:
        return self.settings.storage.data_dir / "thumbs"

    def evaluation_service(self) -> EvaluationService | None:
        """The explicit service, else one the node carries (wired after the app was built)."""
        return self.evaluation or getattr(self.node, "evaluation", None)

    def assembler(self) -> StudyAssembler:
        if self.node is not None:
            return self.node.assembler  # type: ignore[no-any-return]
        from dicom_node.studies import StudyAssembler

        studies = self.settings.studies
        return StudyAssembler(self.engine, self.spool, studies.selection,
                              studies.quiet_period_s, release_grace_s=studies.release_grace_s)


def web_context() -> WebContext:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
