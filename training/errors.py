"""The training side's exceptions: one base, and subclasses that also inherit the matching
builtin (as :mod:`dicom_node.errors` does), so ``except ValueError`` keeps working.

Each step keeps its own error next to its code (``training.split.SplitError``,
``training.fit.checkpoint.CheckpointError``, ...), re-based on :class:`TrainingError`; the
``training`` CLI catches :class:`TrainingError` once instead of listing every class. The
error of both fit tasks lives here because the fit engine and both task hooks raise it.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error the training side raises on purpose (the CLI shows its message)."""


class FitError(TrainingError, ValueError):
    """A problem with a fit run's inputs or state that the user can fix (either task)."""
