"""override.add_sent_at: an add sent to mailcow whose outcome is not recorded yet

Revision ID: 3b9e4f0a6c21
Revises: 8d3f6b21c4e7
Create Date: 2026-11-29 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.db import UTCDateTime

revision: str = "3b9e4f0a6c21"
down_revision: str | None = "8d3f6b21c4e7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("override", sa.Column("add_sent_at", UTCDateTime(), nullable=True))
    # Applies in flight, or cancelled while in flight, with no row recorded: an add may have been sent.
    op.execute(
        "UPDATE override SET add_sent_at = apply_started_at "
        "WHERE state IN ('approved', 'removing') AND mailcow_id IS NULL AND apply_started_at IS NOT NULL"
    )


def downgrade() -> None:
    # Plain ALTER (SQLite >= 3.35 has DROP COLUMN): a batch rebuild of `override` would trip the
    # foreign key from `vote` on SQLite.
    op.execute("ALTER TABLE override DROP COLUMN add_sent_at")
