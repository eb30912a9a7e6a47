"""What ``training evaluate`` produced: per-image predictions and per-model figures.

Split from :mod:`training.evaluate` (which computes them) so :mod:`training.report` (which
writes them) imports this and not the evaluation: that import ran both ways before (an
import circle ``evaluate <-> report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ai.reference.evaluate import LabelMetrics
from ai.types import ModelIdentity

SCHEMA = "cxr-ai-node/evaluation/1"


@dataclass(frozen=True)
class Prediction:
    """One label's score on one image from one model, with the reference standard."""

    model: ModelIdentity
    sop_instance_uid: str
    label: str
    probability: float
    threshold: float
    positive: bool
    truth: int | None


@dataclass
class ModelReport:
    """The figures of one bundle: per-label rows plus the labels it could not be scored on."""

    identity: ModelIdentity
    metadata: dict[str, Any]
    labels: list[LabelMetrics]
    not_evaluated: dict[str, str] = field(default_factory=dict)
    detection: dict[str, Any] | None = None
    # Grad-CAM localisation per label (ai.reference.localisation), None without locations
    localisation: dict[str, dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": {**self.metadata},
            "task": self.identity.task,
            "metrics": {m.label: m.as_dict() for m in self.labels},
            "not_evaluated": dict(self.not_evaluated),
            **({"detection": self.detection} if self.detection is not None else {}),
            **({"localisation": self.localisation} if self.localisation is not None else {}),
        }


@dataclass
class EvaluationReport:
    """Everything ``training evaluate`` writes."""

    models: list[ModelReport]
    data: dict[str, Any]
    predictions: list[Prediction]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "conventions": {
                "positive": "probability >= threshold (the bundle's operating threshold)",
                "proportion_ci": "Wilson score 95%",
                "f1_ci": "bootstrap of the confusion matrix 95%",
                "auroc_ci": "stratified percentile bootstrap 95%",
                "average_precision": "step-wise area under the PR curve (no interpolation), "
                "stratified bootstrap 95%",
            },
            "data": self.data,
            "models": [m.as_dict() for m in self.models],
        }
