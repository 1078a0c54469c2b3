"""Tables of the notifier: each sink's position in the audit trail (the trail is the outbox), the
deliveries that failed and wait for a retry or an admin (dead letters), and Slack's bookkeeping."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from app.core.db import UTCDateTime


class NotificationCursor(SQLModel, table=True):
    """One row per sink: the last event it handled, and whether the receiver is paused (unavailable)."""

    __tablename__ = "notification_cursor"

    sink: str = Field(primary_key=True, max_length=100)
    last_seq: int = Field(default=0)
    # Consecutive answers that say "the receiver is unavailable" (connection error, timeout, 5xx, 408, 429);
    # while `next_attempt_at` lies ahead the sink is paused. A refusal (other 4xx) pauses nothing.
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_error: str | None = None
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    delivered: int = Field(default=0)
    dropped: int = Field(default=0)  # events that became dead letters


class NotificationState(StrEnum):
    retrying = "retrying"  # its first delivery failed; retried on its own schedule, the others go on
    failed = "failed"  # a dead letter: every attempt failed; an admin may re-queue it
    delivered = "delivered"  # a retry (or a re-queued dead letter) got through


class Notification(SQLModel, table=True):
    """An event one sink did not take on the first attempt, with the body exactly as first sent."""

    __tablename__ = "notification"
    __table_args__ = (
        UniqueConstraint("sink", "seq", name="uq_notification_sink_seq"),
        Index("ix_notification_state_due", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sink: str = Field(max_length=100)
    seq: int  # the audit event
    webhook_id: str = Field(max_length=100)
    event_type: str = Field(max_length=60)
    override_id: int | None = None
    state: NotificationState = Field(
        sa_column=Column(
            SAEnum(NotificationState, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
            nullable=False,
        )
    )
    version: int = Field(default=1)
    attempts: int = Field(default=1)
    next_attempt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_error: str | None = Field(default=None, max_length=500)
    last_status: int | None = None  # the receiver's HTTP status, if it answered
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class SlackMessage(SQLModel, table=True):
    """The Slack message (channel, ts) that announced an override in a sink's channel, updated in place
    by chat.update on each later event of that override."""

    __tablename__ = "slack_message"

    sink: str = Field(primary_key=True, max_length=100)
    override_id: int = Field(primary_key=True)
    channel: str = Field(max_length=40)
    ts: str = Field(max_length=40)
    last_seq: int  # the event the message shows; an older one never overwrites it
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class SlackRequestSeen(SQLModel, table=True):
    """Signatures of the Slack requests taken within the replay window: every API replica sees them."""

    __tablename__ = "slack_request_seen"

    digest: str = Field(primary_key=True, max_length=64)  # SHA-256 of the signature header
    seen_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
