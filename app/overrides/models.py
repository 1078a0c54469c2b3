"""Tables of the override workflow (the API schemas live in `schemas.py`)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum, StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, func, text
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


class EndReason(StrEnum):
    """Why an override ended, or is being removed from mailcow to end."""

    expired = "expired"
    revoked = "revoked"
    remediated = "remediated"  # the recipient fixed DANE
    cancelled = "cancelled"
    apply_failed = "apply_failed"
    lapsed = "lapsed"  # nobody decided within the review window
    conflict = "conflict"  # an admin abandoned it to a foreign row


class ConflictStatus(Enum):
    """Where a foreign row at an override's destination stands (`Override.conflict["status"]`, its value);
    it moves through `app.overrides.lifecycle.CONFLICT_TRANSITIONS` only. (Not a `str`: `replace` would
    shadow `str.replace`.)"""

    open = "open"  # found and left untouched: an admin decides
    replace = "replace"  # the admin chose to replace it: the worker deletes it (its snapshot is kept)
    replaced = "replaced"  # deleted; ours is applied; it comes back when the override ends
    restoring = "restoring"  # ours is gone from mailcow: the snapshot is being put back
    restored = "restored"
    not_restored = "not_restored"  # another row holds the destination now, or mailcow refused the snapshot
    abandoned = "abandoned"  # the admin gave the override up: the row stays as it was


class QueueReleaseStatus(StrEnum):
    """Where the release of an override's deferred mail stands (`Override.queue_release["status"]`); it moves
    through `app.overrides.lifecycle.QUEUE_RELEASE_TRANSITIONS` only."""

    releasing = "releasing"  # its queue ids are about to be handed to `deliver` (a worker killed now redoes it)
    released = "released"  # the destination's deferred messages were handed to `deliver`: the check is due
    clear = "clear"  # the check found none of its mail deferred for TLS: the override works
    still_stuck = "still_stuck"  # the check found its mail deferred for TLS: the override does not help
    watching = "watching"  # the override ended: new TLS deferrals for the destination are watched for
    watched = "watched"  # the watch window is over


def queue_release_status_of(value: dict[str, Any] | None) -> QueueReleaseStatus | None:
    return QueueReleaseStatus(value["status"]) if value else None


def conflict_status_of(conflict: dict[str, Any] | None) -> ConflictStatus | None:
    return ConflictStatus(conflict["status"]) if conflict else None


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable))


class Override(SQLModel, table=True):
    __tablename__ = "override"
    # Each list filter with the page's order (`id`), so a page reads only its own rows at any table size.
    __table_args__ = (
        Index("ix_override_state_id", "state", "id"),
        Index("ix_override_requested_by_key_id", "requested_by_key", "id"),
        Index("ix_override_destination_id", "destination", "id"),
        Index("ix_override_target_id", "target", "id"),
        Index("ix_override_ticket_lower_id", func.lower(text("ticket")), "id"),
        Index("ix_override_target_destination", "target", "destination"),
        Index("ix_override_queue_due_at", "queue_due_at"),
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
    requested_by_key: str = Field(max_length=200)
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
    end_reason: EndReason | None = Field(
        default=None,
        sa_column=Column(
            SAEnum(EndReason, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
            nullable=True,
        ),
    )
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
    # What mailcow's queue holds for the destination (app.overrides.stuck: counts, reasons, times; never
    # addresses), gathered on create and refreshed while the override is pending or active.
    queue: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    # The release of the destination's deferred mail once active, its check, the watch after the end
    # (app/worker/release.py), and when the next of those passes is due (None: none is).
    queue_release: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    queue_due_at: datetime | None = _ts()

    @property
    def conflict_status(self) -> ConflictStatus | None:
        return conflict_status_of(self.conflict)

    @property
    def queue_release_status(self) -> QueueReleaseStatus | None:
        return queue_release_status_of(self.queue_release)


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
