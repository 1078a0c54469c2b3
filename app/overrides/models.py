"""Tables of the override workflow (the API schemas live in `schemas.py`)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, text
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from app.core.db import UTCDateTime


class OverrideState(StrEnum):
    pending = "pending"
    approved = "approved"
    active = "active"
    removing = "removing"
    expired = "expired"
    revoked = "revoked"
    remediated = "remediated"
    rejected = "rejected"
    cancelled = "cancelled"
    lapsed = "lapsed"
    failed = "failed"


TERMINAL_STATES = frozenset(
    {
        OverrideState.expired,
        OverrideState.revoked,
        OverrideState.remediated,
        OverrideState.rejected,
        OverrideState.cancelled,
        OverrideState.lapsed,
        OverrideState.failed,
    }
)
# States in which an override holds (or may hold) its destination at the target.
LIVE_STATES = frozenset({OverrideState.pending, OverrideState.approved, OverrideState.active, OverrideState.removing})


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable))


class Override(SQLModel, table=True):
    __tablename__ = "override"
    __table_args__ = (
        Index("ix_override_state", "state"),
        Index("ix_override_target_destination", "target", "destination"),
        # One live override per target+destination, enforced by the database itself.
        Index(
            "uq_override_live_destination",
            "target",
            "destination",
            unique=True,
            sqlite_where=text("live = 1"),
            postgresql_where=text("live"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    target: str = Field(max_length=100)
    destination: str = Field(max_length=255)
    policy: str = Field(max_length=20)
    parameters: str = Field(default="", max_length=255)
    justification: str
    ticket: str | None = Field(default=None, max_length=200)
    ticket_url: str | None = Field(default=None, max_length=2000)
    duration_seconds: int
    state: OverrideState = Field(
        sa_column=Column(
            SAEnum(OverrideState, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
            nullable=False,
        )
    )
    live: bool = Field(default=True)
    version: int = Field(default=1)

    # A person is recorded as given (shown) and by their key (compared: app/core/person.py).
    requested_by: str = Field(max_length=200)
    requested_by_key: str = Field(max_length=200, index=True)
    requested_by_name: str = Field(max_length=200)
    requested_via: str | None = Field(default=None, max_length=200)
    approvals_required: int = Field(default=1)

    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    review_deadline: datetime | None = _ts()
    applied_at: datetime | None = _ts()
    expires_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()

    # Removal: why it ends, and by when mailcow must be clean (else it is overdue).
    end_reason: str | None = Field(default=None, max_length=20)
    removal_deadline: datetime | None = _ts()

    # Pending extension request (approved through the same approve/reject actions).
    extension_round: int = Field(default=0)
    extension_seconds: int | None = None
    extension_requested_by: str | None = Field(default=None, max_length=200)
    extension_requested_by_key: str | None = Field(default=None, max_length=200)

    # Worker bookkeeping.
    mailcow_id: int | None = None
    # An add sent to mailcow (apply or re-apply) whose outcome is not recorded yet: while it is set, a row
    # with our content at the destination may be ours, and for a while it may still appear (a lost answer).
    add_sent_at: datetime | None = _ts()
    next_attempt_at: datetime | None = _ts()
    attempts: int = Field(default=0)
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = _ts()
    last_error: str | None = None
    conflict: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    drift: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    diagnosis: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    findings: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    clean_checks: int = Field(default=0)
    last_checked_at: datetime | None = _ts()


class Vote(SQLModel, table=True):
    """One reviewer's decision on one round (0 = the request, n = the n-th extension)."""

    __tablename__ = "vote"
    # One vote per person and round, whatever spelling of their name each vote came with.
    __table_args__ = (UniqueConstraint("override_id", "round", "reviewer_key", name="uq_vote_one_per_reviewer"),)

    id: int | None = Field(default=None, primary_key=True)
    override_id: int = Field(foreign_key="override.id", index=True)
    round: int = Field(default=0)
    reviewer: str = Field(max_length=200)
    reviewer_key: str = Field(max_length=200)
    reviewer_name: str = Field(max_length=200)
    via: str | None = Field(default=None, max_length=200)
    decision: str = Field(max_length=10)  # approve | reject
    comment: str
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
