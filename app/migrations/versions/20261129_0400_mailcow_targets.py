"""mailcow targets: reconcile schedule and lease, inventory counts, auth-failure pause

Revision ID: 8d3f6b21c4e7
Revises: 5c1e0a7d2b90
Create Date: 2026-11-29 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from app.core.db import UTCDateTime

revision: str = "8d3f6b21c4e7"
down_revision: str | None = "5c1e0a7d2b90"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mailcow_target",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("reconcile_due_at", UTCDateTime(), nullable=True),
        sa.Column("lease_owner", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("last_reconcile_at", UTCDateTime(), nullable=True),
        sa.Column("last_reconcile_error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("rows_owned", sa.Integer(), nullable=False),
        sa.Column("rows_foreign", sa.Integer(), nullable=False),
        sa.Column("paused_until", UTCDateTime(), nullable=True),
        sa.Column("pause_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("mailcow_target")
