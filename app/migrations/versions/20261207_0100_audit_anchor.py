"""audit anchor: audit_head.checkpoint_seq (when the next signed checkpoint is due) and the refusal tally

Revision ID: a68735ecc777
Revises: 6f2a9c4e8b13
Create Date: 2026-12-07 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from app.core.db import UTCDateTime

revision: str = "a68735ecc777"
down_revision: str | None = "6f2a9c4e8b13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_head", sa.Column("checkpoint_seq", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "audit_refusal_tally",
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("via", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("override_id", sa.Integer(), nullable=True),
        sa.Column("attempted", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("opened_at", UTCDateTime(), nullable=False),
        sa.Column("written", sa.Integer(), nullable=False),
        sa.Column("suppressed", sa.Integer(), nullable=False),
        sa.Column("last_at", UTCDateTime(), nullable=True),
        sa.Column("last_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(op.f("ix_audit_refusal_tally_opened_at"), "audit_refusal_tally", ["opened_at"], unique=False)


def downgrade() -> None:
    # Counted refusals not yet written to the trail would be lost with the table: refuse instead.
    pending = op.get_bind().execute(sa.text("SELECT coalesce(sum(suppressed), 0) FROM audit_refusal_tally")).scalar()
    if pending:
        raise RuntimeError(
            f"audit_refusal_tally holds {pending} refused attempts not yet in the audit trail: let the worker "
            "close their windows (TLSO_AUDIT_REFUSAL_WINDOW_SECONDS) before downgrading"
        )
    op.drop_index(op.f("ix_audit_refusal_tally_opened_at"), table_name="audit_refusal_tally")
    op.drop_table("audit_refusal_tally")
    # Plain ALTER TABLE (SQLite >= 3.35 has DROP COLUMN), as in 3b9e4f0a6c21.
    op.execute("ALTER TABLE audit_head DROP COLUMN checkpoint_seq")
