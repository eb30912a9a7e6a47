"""Exceptions of the evaluation jobs (all :class:`dicom_node.errors.NodeError`)."""

from __future__ import annotations

from dicom_node.errors import NodeError


class EvaluationError(NodeError, RuntimeError):
    """A run cannot produce figures (missing reference set, no analysable image, ...)."""


class EvaluationInterrupted(EvaluationError):
    """The node is stopping; the run ends as failed and the next start may catch it up."""


class UnknownJobError(NodeError, LookupError):
    """No evaluation job of that name is configured."""


class EvaluationBusyError(NodeError, RuntimeError):
    """The job is already running (in this or another process); a second run is refused."""

    def __init__(self, message: str, run_id: int) -> None:
        super().__init__(message)
        self.run_id = run_id


class ConfirmedLabelError(NodeError, ValueError):
    """Confirmed ground truth is malformed (bad key, UID, label name or value)."""
