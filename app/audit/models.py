"""The append-only audit trail and the head of its hash chain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from app.core.db import UTCDateTime

GENESIS_HASH = "0" * 64


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    # The audit page's filters with its order (`seq`).
    __table_args__ = (
        Index("ix_audit_event_action_seq", "action", "seq"),
        Index("ix_audit_event_actor_seq", "actor", "seq"),
        Index("ix_audit_event_override_id_seq", "override_id", "seq"),
    )

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    actor: str = Field(max_length=200)
    via: str | None = Field(default=None, max_length=200)
    action: str = Field(max_length=60)
    override_id: int | None = Field(default=None)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    comment: str | None = None
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """One row: the last sequence number and hash. Locking it serialises appends to the chain."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0)
    hash: str = Field(default=GENESIS_HASH, max_length=64)
    # The last `audit.checkpoint` event: only tells the worker when the next checkpoint is due.
    checkpoint_seq: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class RefusalTally(SQLModel, table=True):
    """Refused attempts of one caller on one override and action in the current window (see refusals.py)."""

    __tablename__ = "audit_refusal_tally"

    key: str = Field(primary_key=True, max_length=64)  # SHA-256 of (actor, via, override_id, attempted)
    actor: str = Field(max_length=200)
    via: str | None = Field(default=None, max_length=200)
    override_id: int | None = None
    attempted: str
    opened_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    written: int = Field(default=1)  # rows written in full in this window
    suppressed: int = Field(default=0)  # attempts counted, not yet written (a summary row will carry them)
    last_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_reason: str | None = None
