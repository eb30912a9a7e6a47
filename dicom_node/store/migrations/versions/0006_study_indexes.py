"""Revision 0006 (after 0005, 2026-12-06): indexes ``ix_outputs_study`` on
``outputs.study_uid`` and ``ix_jobs_study`` on ``jobs.study_uid``.

Every lookup of a study's results or jobs scanned a table that grows with every study:
retention's search for candidates (a correlated lookup of each finished study's results) ran
for more than ten minutes on a database of 131,072 studies; the job claim's version lookup
(all done jobs through the state index, under the write lock) took 8.9 ms at 65,536 jobs,
the study's latest job for an ignored study 4.7 ms, the dashboard's per-study delivery
summary 23 ms. With the indexes each is a lookup (0.01-0.2 ms)."""

from __future__ import annotations

from alembic import op

revision, down_revision = "0006", "0005"
branch_labels = depends_on = None


def upgrade() -> None:
    op.create_index("ix_outputs_study", "outputs", ["study_uid"])
    op.create_index("ix_jobs_study", "jobs", ["study_uid", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_study", table_name="jobs")
    op.drop_index("ix_outputs_study", table_name="outputs")
