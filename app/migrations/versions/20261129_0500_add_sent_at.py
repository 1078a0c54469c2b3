"""override.add_sent_at replaces apply_started_at: an add sent to mailcow whose outcome is not recorded

`apply_started_at` was set when the worker claimed an apply, before anything was sent; the new marker
is set just before the add goes out and cleared once its outcome is known, so it says what the old
column only guessed.

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

# Plain ALTER TABLE throughout (SQLite >= 3.35 has DROP COLUMN): a batch rebuild of `override` would
# trip the foreign key from `vote` on SQLite.


def upgrade() -> None:
    op.add_column("override", sa.Column("add_sent_at", UTCDateTime(), nullable=True))
    # Applies in flight, or cancelled while in flight, with no row recorded: an add may have been sent.
    op.execute(
        "UPDATE override SET add_sent_at = apply_started_at "
        "WHERE state IN ('approved', 'removing') AND mailcow_id IS NULL AND apply_started_at IS NOT NULL"
    )
    op.execute("ALTER TABLE override DROP COLUMN apply_started_at")


def downgrade() -> None:
    op.add_column("override", sa.Column("apply_started_at", UTCDateTime(), nullable=True))
    op.execute("UPDATE override SET apply_started_at = add_sent_at")
    op.execute("ALTER TABLE override DROP COLUMN add_sent_at")
