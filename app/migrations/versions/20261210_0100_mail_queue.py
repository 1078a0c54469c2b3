"""mail queue evidence: what mailcow's queue holds for an override's destination (counts, delay
reasons, oldest arrival; never addresses), gathered on create and refreshed while pending or active

Revision ID: c3d81f5a9e27
Revises: 3e8b5d1c9f42
Create Date: 2026-12-10 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c3d81f5a9e27"
down_revision: str | None = "3e8b5d1c9f42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("override", sa.Column("queue", sa.JSON(), nullable=True))


def downgrade() -> None:
    # A plain ALTER (SQLite 3.35+ has DROP COLUMN): a batch rebuild of `override` would break the votes'
    # foreign keys on a database in use.
    op.execute("ALTER TABLE override DROP COLUMN queue")
