"""``dicom-node evaluate``: run one job now (synchronously) or list the jobs.

Exit status: 0 the run succeeded (alerts are printed, not an error), 1 the run failed
(the reason is printed and stored), 3 the job is already running elsewhere; an unknown job
raises :class:`UnknownJobError`, which the CLI prints and answers with 2.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from ai.types import Analyzer
from dicom_node.analysis import load_analyzer
from dicom_node.config import Settings
from dicom_node.evaluation.errors import EvaluationBusyError
from dicom_node.evaluation.report import format_jobs, format_run
from dicom_node.evaluation.service import EvaluationService
from dicom_node.store import db
from dicom_node.store.states import RunState

EXIT_FAILED = 1
EXIT_BUSY = 3


def _lazy_deployed(settings: Settings
                   ) -> tuple[Callable[[], Analyzer | None], Callable[[], str | None]]:
    """Load the node's bundles on first use, the way ``serve`` does; remember a failure."""
    state: dict[str, object] = {}
    lock = threading.Lock()

    def deployed() -> Analyzer | None:
        with lock:
            if "analyzer" not in state and "error" not in state:
                try:
                    state["analyzer"] = load_analyzer(settings)
                except Exception as exc:  # noqa: BLE001 - reported as the run's failure
                    state["error"] = f"{type(exc).__name__}: {exc}"
            return state.get("analyzer")  # type: ignore[return-value]

    def model_error() -> str | None:
        return state.get("error")  # type: ignore[return-value]

    return deployed, model_error


def evaluate_command(settings: Settings, *, job_name: str | None, list_jobs: bool) -> int:
    engine = db.make_engine(settings.database_url)
    try:
        deployed, model_error = _lazy_deployed(settings)
        service = EvaluationService(engine, settings, deployed=deployed, model_error=model_error)
        if list_jobs:
            print(format_jobs(service.list_jobs()))
            return 0
        assert job_name is not None
        try:
            detail = service.run_now(job_name, trigger="manual")
        except EvaluationBusyError as exc:
            print(f"dicom-node: {exc}; try again when it has finished", file=sys.stderr)
            return EXIT_BUSY
        print(format_run(detail))
        if detail.run.state != RunState.SUCCEEDED:
            print(f"dicom-node: evaluation job {job_name!r} run {detail.run.id} failed: "
                  f"{detail.run.error}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    finally:
        engine.dispose()
