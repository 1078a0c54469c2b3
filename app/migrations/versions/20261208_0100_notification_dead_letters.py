"""notification dead letters and Slack: failed deliveries kept per sink and event, Slack messages and
the signatures of Slack requests seen within the replay window

An event a sink does not take on the first attempt leaves the sink's line (`notification`, state
`retrying`) so that the events after it keep flowing; after `TLSO_NOTIFY_MAX_ATTEMPTS` it is a dead
letter (`failed`) until an admin re-queues it.

Revision ID: 3e8b5d1c9f42
Revises: 7a4c2e9d1f08
Create Date: 2026-12-08 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from app.core.db import UTCDateTime

revision: str = "3e8b5d1c9f42"
down_revision: str | None = "7a4c2e9d1f08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sink", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("event_type", sqlmodel.sql.sqltypes.AutoString(length=60), nullable=False),
        sa.Column("override_id", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum("retrying", "failed", "delivered", name="notificationstate", native_enum=False, length=20),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sink", "seq", name="uq_notification_sink_seq"),
    )
    op.create_index("ix_notification_state_due", "notification", ["state", "next_attempt_at"], unique=False)
    op.create_table(
        "slack_message",
        sa.Column("sink", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("override_id", sa.Integer(), nullable=False),
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("ts", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sink", "override_id"),
    )
    op.create_table(
        "slack_request_seen",
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index(op.f("ix_slack_request_seen_seen_at"), "slack_request_seen", ["seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_slack_request_seen_seen_at"), table_name="slack_request_seen")
    op.drop_table("slack_request_seen")
    op.drop_table("slack_message")
    op.drop_index("ix_notification_state_due", table_name="notification")
    op.drop_table("notification")
