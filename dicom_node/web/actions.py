"""State-changing operations behind the API and the dashboard buttons.

Re-analysis policy
------------------
``reanalyse(study)`` is allowed when the study is done, ignored or failed (409 while it is
receiving, queued or analysing, or once retention removed its images). Every instance of the study goes back to ``pending`` and
the study to ``receiving``; the study assembler (the one place that applies the selection
rules) then builds a new job from the instances the *current* rules select. It runs at
once in the request when the study's quiet period has passed, else on the assembler's
next round.

Output UIDs derive from the input SOP Instance UIDs and the model identities
(``dicom_node.worker.uid_seed``). So a re-analysis with the same model(s) and inputs
rebuilds the *same* SR/SC/GSPS (same UIDs, files rewritten) and creates no new
deliveries: what was sent is not sent twice, and a destination added since gets its
first copy. After a model change (new version = new device UID) the results are new
objects in new series, delivered like any new result; the earlier ones stay valid as
what the earlier model said. To send the same objects again, resubmit their dead
deliveries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select

from dicom_node.delivery.ledger import RESUBMITTABLE, resubmit
from dicom_node.store import db
from dicom_node.store.states import StudyState
from dicom_node.store.transitions import reopen_study, reset_instances
from dicom_node.web.context import WebContext
from dicom_node.web.errors import ApiError

logger = logging.getLogger(__name__)

REANALYSABLE = (StudyState.DONE, StudyState.IGNORED, StudyState.FAILED)


def reanalyse(ctx: WebContext, study_uid: str) -> dict[str, Any]:
    now = time.time()
    with ctx.engine.begin() as conn:
        state = conn.execute(select(db.studies.c.state)
                             .where(db.studies.c.study_uid == study_uid)).scalar_one_or_none()
        if state is None:
            raise ApiError(404, "study not found")
        if state not in REANALYSABLE:
            raise ApiError(409, f"study is {state}; it can be re-analysed once it is "
                           f"{', '.join(REANALYSABLE)}", code="invalid_state")
        if conn.execute(select(db.instances.c.id).where(db.instances.c.study_uid == study_uid)
                        .where(db.instances.c.purged_at.is_not(None)).limit(1)).first():
            raise ApiError(409, "the study's images were removed by retention; send them "
                           "again to analyse it", code="purged")
        reset = reset_instances(conn, study_uid)
        reopen_study(conn, study_uid, now)
    logger.info("re-analysis of study %s requested: %d instance(s) pending again", study_uid,
                reset)
    job_id = ctx.assembler().assemble(study_uid, time.time())
    with db.reading(ctx.engine) as conn:
        current = conn.execute(select(db.studies.c.state)
                               .where(db.studies.c.study_uid == study_uid)).scalar_one()
        if job_id is None:  # the background assembler may have been first
            job_id = conn.execute(select(db.jobs.c.id).where(db.jobs.c.study_uid == study_uid)
                                  .where(db.jobs.c.created_at >= now)
                                  .order_by(db.jobs.c.id.desc()).limit(1)).scalar_one_or_none()
    return {"study_uid": study_uid, "instances": reset, "state": current,
            "job_id": job_id}


def resubmit_one(ctx: WebContext, delivery_id: int, actor: str = "api") -> dict[str, Any]:
    with db.reading(ctx.engine) as conn:
        state = conn.execute(select(db.deliveries.c.state)
                             .where(db.deliveries.c.id == delivery_id)).scalar_one_or_none()
    if state is None:
        raise ApiError(404, "delivery not found")
    if (state not in RESUBMITTABLE
            or resubmit(ctx.engine, delivery_ids=[delivery_id], actor=actor) != 1):
        raise ApiError(409, f"delivery is {state}; only a dead or not accepted delivery can "
                       "be resubmitted", code="invalid_state")
    return {"resubmitted": 1}


def resubmit_dead(ctx: WebContext, destination: str | None, actor: str = "api"
                  ) -> dict[str, Any]:
    """Every dead and not-accepted delivery (of one destination, when given) back to the
    queue (e.g. once the PACS takes the SOP class)."""
    return {"resubmitted": resubmit(ctx.engine, destination=destination, actor=actor)}
