"""list indexes and the shared diagnosis budget: an index for every list filter in the keyset order,
the case-insensitive ticket filter, the audit page's filters; the diagnosis rate limit and the recent
diagnoses in the database, so that every API replica keeps one budget and one cache

Every filter of `GET /v1/overrides` (state, destination, requester, target, and `lower(ticket)`) gets an
index whose last column is `id`, the page's order: a page of 50 reads 50 index entries at any table size.
The audit page's filters (action, actor, override) end with `seq`, its order. The single-column indexes
these extend go.

Revision ID: e5fa3b7c1d49
Revises: d4e92a6b0f38
Create Date: 2026-12-10 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from app.core.db import UTCDateTime

revision: str = "e5fa3b7c1d49"
down_revision: str | None = "d4e92a6b0f38"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (index, table, columns) replaced by the ones below
REPLACED = (
    ("ix_override_state", "override", ["state"]),
    ("ix_override_requested_by_key", "override", ["requested_by_key"]),
    ("ix_audit_event_action", "audit_event", ["action"]),
    ("ix_audit_event_actor", "audit_event", ["actor"]),
    ("ix_audit_event_override_id", "audit_event", ["override_id"]),
)
CREATED = (
    ("ix_override_state_id", "override", ["state", "id"]),
    ("ix_override_requested_by_key_id", "override", ["requested_by_key", "id"]),
    ("ix_override_destination_id", "override", ["destination", "id"]),
    ("ix_override_target_id", "override", ["target", "id"]),
    ("ix_audit_event_action_seq", "audit_event", ["action", "seq"]),
    ("ix_audit_event_actor_seq", "audit_event", ["actor", "seq"]),
    ("ix_audit_event_override_id_seq", "audit_event", ["override_id", "seq"]),
)


def upgrade() -> None:
    for name, table, columns in CREATED:
        op.create_index(name, table, columns, unique=False)
    op.create_index("ix_override_ticket_lower_id", "override", [sa.text("lower(ticket)"), "id"], unique=False)
    for name, table, _ in REPLACED:
        op.drop_index(name, table_name=table)

    op.create_table(
        "diagnosis_call",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("caller", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_diagnosis_call_caller_at", "diagnosis_call", ["caller", "at"], unique=False)
    op.create_index("ix_diagnosis_call_at", "diagnosis_call", ["at"], unique=False)
    op.create_table(
        "recent_diagnosis",
        sa.Column("domain", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("checked_at", UTCDateTime(), nullable=False),
        sa.Column("diagnosis", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("domain"),
    )
    op.create_index("ix_recent_diagnosis_checked_at", "recent_diagnosis", ["checked_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_recent_diagnosis_checked_at", table_name="recent_diagnosis")
    op.drop_table("recent_diagnosis")
    op.drop_index("ix_diagnosis_call_at", table_name="diagnosis_call")
    op.drop_index("ix_diagnosis_call_caller_at", table_name="diagnosis_call")
    op.drop_table("diagnosis_call")
    for name, table, columns in REPLACED:
        op.create_index(name, table, columns, unique=False)
    op.drop_index("ix_override_ticket_lower_id", table_name="override")
    for name, table, _ in CREATED:
        op.drop_index(name, table_name=table)
