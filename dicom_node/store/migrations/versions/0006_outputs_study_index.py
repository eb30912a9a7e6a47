"""Revision 0006 (after 0005, 2026-12-06): index ``ix_outputs_study`` on
``outputs.study_uid``. Every query that looks up a study's results (the worker's earlier
outputs of a study, retention's candidates, the dashboard's delivery summary per study)
scanned the whole table without it: retention's search for candidates ran for more than ten
minutes on a database of 131,072 studies and outputs."""

from __future__ import annotations

from alembic import op

revision, down_revision = "0006", "0005"
branch_labels = depends_on = None


def upgrade() -> None:
    op.create_index("ix_outputs_study", "outputs", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_outputs_study", table_name="outputs")
