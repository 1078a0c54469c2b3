"""queue release: the release of an active override's deferred mail, its check, the watch after the end

`override.queue_release` (JSON, its `status` moves through lifecycle.QUEUE_RELEASE_TRANSITIONS) and
`override.queue_due_at`, when the worker's next queue pass for the override is due (indexed: the worker
claims by it).

Revision ID: d4e92a6b0f38
Revises: c3d81f5a9e27
Create Date: 2026-12-10 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.db import UTCDateTime

revision: str = "d4e92a6b0f38"
down_revision: str | None = "c3d81f5a9e27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN (SQLite >= 3.35 drops columns itself): a batch copy of `override` would trip the
# foreign key from `vote` on SQLite.


def upgrade() -> None:
    op.add_column("override", sa.Column("queue_release", sa.JSON(), nullable=True))
    op.add_column("override", sa.Column("queue_due_at", UTCDateTime(), nullable=True))
    op.create_index("ix_override_queue_due_at", "override", ["queue_due_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_override_queue_due_at", table_name="override")
    op.execute("ALTER TABLE override DROP COLUMN queue_due_at")
    op.execute("ALTER TABLE override DROP COLUMN queue_release")
