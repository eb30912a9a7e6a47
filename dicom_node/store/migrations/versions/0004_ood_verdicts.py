"""Out-of-distribution verdicts: ``ood_verdicts``, one row per (job, image, gated model).

A row with ``out_of_distribution`` true means that model's findings were withheld for that
image (ai.bundle.gate); the API, dashboard, ``dicom-node results`` and /metrics read it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table("ood_verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("device_uid", sa.String(length=64), nullable=False),
        sa.Column("model_demo", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("out_of_distribution", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id")
    )  # fmt: skip
    op.create_index("ix_ood_verdicts_job", "ood_verdicts", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_ood_verdicts_job", table_name="ood_verdicts")
    op.drop_table("ood_verdicts")
