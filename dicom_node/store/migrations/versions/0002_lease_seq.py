"""Leases watched by sequence number: ``jobs.lease_seq`` and ``deliveries.lease_seq``.

Every claim and renewal bumps the row's ``lease_seq``; a claimer takes over an expired lease
only after it has seen the same number for a whole lease on its own monotonic clock
(:mod:`dicom_node.clock`), so a jump of the database's clock takes no job from a live owner.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

TABLES = ("jobs", "deliveries")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("lease_seq", sa.Integer(), nullable=False,
                                       server_default="0"))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_seq")
