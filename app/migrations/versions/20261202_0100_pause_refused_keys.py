"""mailcow_target.refused_keys: fingerprints of the API keys a pause is for (a corrected key ends it)

A pause written before this column existed names no key, so it holds for none: the first call with
the configured key finds out whether it is still refused (one failed login at most, then a pause that
names the key).

Revision ID: 6f2a9c4e8b13
Revises: 3b9e4f0a6c21
Create Date: 2026-12-02 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "6f2a9c4e8b13"
down_revision: str | None = "3b9e4f0a6c21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("mailcow_target", sa.Column("refused_keys", sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE (SQLite >= 3.35 has DROP COLUMN), as in 20261129_0500.
    op.execute("ALTER TABLE mailcow_target DROP COLUMN refused_keys")
