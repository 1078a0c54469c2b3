"""Delivery position of each notification sink in the audit trail (the trail is the outbox)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.core.db import UTCDateTime


class NotificationCursor(SQLModel, table=True):
    __tablename__ = "notification_cursor"

    sink: str = Field(primary_key=True, max_length=100)
    last_seq: int = Field(default=0)
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_error: str | None = None
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    delivered: int = Field(default=0)
    dropped: int = Field(default=0)
