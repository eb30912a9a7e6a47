"""Revision 0005 (after 0004, 2026-12-05): ``evaluation_metrics.localisation``, the Grad-CAM
localisation of a figure as JSON (pointing-game hit rate with its interval, energy inside the
lungs, counts; :mod:`ai.reference.localisation`) for classification labels of reference runs
whose reference set has a ``locations.json``; null otherwise."""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, Text

revision, down_revision = "0005", "0004"
branch_labels = depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation_metrics") as batch:
        batch.add_column(Column("localisation", Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_metrics") as batch:
        batch.drop_column("localisation")
