"""Grad-CAM localisation per evaluation figure: ``evaluation_metrics.localisation``.

A JSON object (pointing-game hit rate with its interval, energy inside the lungs, counts;
:mod:`ai.reference.localisation`) for classification labels of reference runs whose
reference set has a ``locations.json``; null otherwise.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation_metrics") as batch:
        batch.add_column(sa.Column("localisation", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_metrics") as batch:
        batch.drop_column("localisation")
