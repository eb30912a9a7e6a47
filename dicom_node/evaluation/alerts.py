"""Floors: a label figure below its configured minimum raises an alert.

The point estimate is compared with the floor (an undefined figure, e.g. sensitivity with
no positive case, is not "below" anything and is only logged). Each alert becomes an
``evaluation_alerts`` row, a WARNING log line (job, model, label, figure: no patient data)
and, when the job has a ``webhook_url``, part of one JSON POST per run. A webhook that
fails is logged and does not fail the run.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dicom_node.evaluation.figures import LabelFigures
from dicom_node.evaluation.settings import FLOOR_METRICS, FloorSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    model_name: str
    model_version: str
    label: str
    metric: str  # sensitivity | specificity
    value: float
    floor: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_floors(figures: Sequence[LabelFigures], floors: Mapping[str, FloorSettings],
                 job_name: str = "") -> list[Alert]:
    """The figures below their floors (labels match by name across models)."""
    alerts = []
    evaluated = {f.label for f in figures}
    for label in sorted(set(floors) - evaluated):
        logger.warning("evaluation job %s: floor for label %r, but no model/reference "
                       "evaluated that label", job_name, label)
    for fig in figures:
        floor = floors.get(fig.label)
        if floor is None:
            continue
        for metric in FLOOR_METRICS:
            minimum = getattr(floor, metric)
            value = getattr(fig, metric).value
            if minimum is None:
                continue
            if math.isnan(value):
                logger.info("evaluation job %s: %s %s %s undefined (no cases), floor %.3f "
                            "not checked", job_name, fig.model_name, fig.label, metric, minimum)
            elif value < minimum:
                alerts.append(Alert(fig.model_name, fig.model_version, fig.label, metric,
                                    value, minimum))
    return alerts


def post_webhook(url: str, payload: Mapping[str, Any], timeout_s: float) -> bool:
    """POST ``payload`` as JSON; True on a 2xx answer. Failures are logged, never raised."""
    body = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("evaluation alert webhook failed: %s", exc)
        return False
    if not 200 <= status < 300:
        logger.warning("evaluation alert webhook answered HTTP %d", status)
        return False
    return True
