"""The override's lifecycle: its states and its conflict's, their transitions tables, and the one
compare-and-set (`transition()`, `update_in_place()`) that checks both tables, updates the row in SQL
only if nobody changed it meanwhile, and queues the audit entry in the same transaction.

Every change of an override goes through here (the API's decisions and the worker's outcomes alike).
Services never commit: the caller's unit of work does.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Protocol, TypeVar

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict, InvalidTransition, NotFound
from app.overrides.models import (
    TERMINAL_STATES,
    ConflictStatus,
    EndReason,
    Override,
    OverrideState,
    QueueReleaseStatus,
    conflict_status_of,
)

State = TypeVar("State", bound=Enum)


def _table(kind: type[State], allowed: dict[str, str]) -> dict[State, frozenset[State]]:
    """A transitions table from state names (a misspelt one fails at import); the states not listed are
    terminal: they never change again."""
    table = {kind(state): frozenset(map(kind, targets.split())) for state, targets in allowed.items()}
    return {state: table.get(state, frozenset()) for state in kind}


TRANSITIONS = _table(
    OverrideState,
    {
        "pending": "approved rejected cancelled lapsed",
        "approved": "active failed cancelled revoked removing",
        "active": "removing",
        # `failed` from `removing`: an apply that failed for good after an admin let it replace a foreign
        # row; the removal puts that row back first.
        "removing": "expired revoked remediated cancelled failed",
    },
)

# A foreign mailcow row at an override's destination (`Override.conflict`). Changed only together with
# the override itself, through the same compare-and-set, which checks this table too.
CONFLICT_TRANSITIONS: dict[ConflictStatus | None, frozenset[ConflictStatus]] = {
    None: frozenset({ConflictStatus.open}),  # the apply found the row
    **{
        status: allowed
        for status, allowed in _table(
            ConflictStatus,
            {
                "open": "replace abandoned",  # an admin decides
                # Before the worker records deleting the row, yet another row may hold the destination (open
                # again), or the override may end: its removal restores the snapshot if the row is gone.
                "replace": "replaced open restoring",
                # A row that is not ours appears where ours was to be added: open again.
                "replaced": "restoring open",
                "restoring": "restored not_restored",
            },
        ).items()
    },
}

# The release of an override's deferred mail (`Override.queue_release`, its status), written by the worker's
# queue pass only (`app.worker.store.move_queue_release`), which checks this table under the row's lock.
QUEUE_RELEASE_TRANSITIONS: dict[QueueReleaseStatus | None, frozenset[QueueReleaseStatus]] = {
    None: frozenset({QueueReleaseStatus.releasing, QueueReleaseStatus.released, QueueReleaseStatus.watching}),
    **{
        status: allowed
        for status, allowed in _table(
            QueueReleaseStatus,
            {
                # Noted before each `deliver` round (and again by a worker that takes over after a kill).
                "releasing": "releasing released watching",
                "released": "clear still_stuck watching",
                # While the override is active the check is repeated with the queue refresh: the flag follows
                # the queue both ways (a status kept in place is no event).
                "clear": "clear still_stuck watching",
                "still_stuck": "still_stuck clear watching",
                # The watch keeps its status while it looks (its episode changes in place) until its window ends.
                "watching": "watching watched",
            },
        ).items()
    },
}

# The ends after which the destination is watched for mail that defers for TLS again.
WATCHED_ENDS = frozenset({OverrideState.expired, OverrideState.revoked, OverrideState.remediated})


def check_queue_release_move(old: QueueReleaseStatus | None, new: QueueReleaseStatus) -> None:
    """Refuse a move of the release's status that its table does not allow."""
    if new not in QUEUE_RELEASE_TRANSITIONS[old]:
        was = old.value if old else None
        raise InvalidTransition(f"A queue release in status '{was}' cannot become '{new.value}'.")


# Why an override is being removed → the state it ends in once mailcow is clean.
END_STATE: dict[EndReason, OverrideState] = {
    EndReason.expired: OverrideState.expired,
    EndReason.revoked: OverrideState.revoked,
    EndReason.remediated: OverrideState.remediated,
    EndReason.cancelled: OverrideState.cancelled,
    EndReason.apply_failed: OverrideState.failed,
}


_SNAPSHOT = ("state", "version", "target", "destination", "policy", "parameters", "expires_at", "mailcow_id")


def snapshot(override: Override) -> dict[str, Any]:
    """The fields an audit entry shows before/after a change."""
    return snapshot_of({name: getattr(override, name) for name in _SNAPSHOT})


def snapshot_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """`snapshot` of an override's column values (a new override's, which need not be an `Override`)."""
    return {name: OverrideState(values[name]).value if name == "state" else values[name] for name in _SNAPSHOT}


def transition(
    session: Session,
    override: Override,
    to: OverrideState,
    *,
    actor: str,
    action: str,
    via: str | None = None,
    comment: str | None = None,
    changes: dict[str, Any] | None = None,
    audit_extra: dict[str, Any] | None = None,
) -> Override:
    """Move `override` to `to` if the table allows it and nobody changed it meanwhile (compare-and-set)."""
    if to not in TRANSITIONS[override.state]:
        raise InvalidTransition(f"An override in state '{override.state}' cannot become '{to}'.")
    return _compare_and_set(
        session,
        override,
        to,
        actor=actor,
        action=action,
        via=via,
        comment=comment,
        changes=changes,
        audit_extra=audit_extra,
    )


def update_in_place(
    session: Session,
    override: Override,
    *,
    actor: str,
    action: str,
    via: str | None = None,
    comment: str | None = None,
    changes: dict[str, Any] | None = None,
    audit_extra: dict[str, Any] | None = None,
) -> Override:
    """Change an override without changing its state (an extension, its conflict), same guarantees."""
    if override.state in TERMINAL_STATES:
        raise InvalidTransition(f"An override in state '{override.state}' never changes again.")
    return _compare_and_set(
        session,
        override,
        override.state,
        actor=actor,
        action=action,
        via=via,
        comment=comment,
        changes=changes,
        audit_extra=audit_extra,
    )


def _compare_and_set(
    session: Session,
    override: Override,
    to: OverrideState,
    *,
    actor: str,
    action: str,
    via: str | None,
    comment: str | None,
    changes: dict[str, Any] | None,
    audit_extra: dict[str, Any] | None,
) -> Override:
    before = snapshot(override)
    now = utcnow()
    moved = _conflict_move(override, changes)
    if moved is not None:
        before["conflict_status"] = moved[0]
    values: dict[str, Any] = {
        "state": to,
        "live": to not in TERMINAL_STATES,
        "version": override.version + 1,
        "updated_at": now,
        **(changes or {}),
    }
    if to in TERMINAL_STATES and override.ended_at is None:
        values.setdefault("ended_at", now)
    # The row as the UPDATE left it comes back with it (RETURNING, into `override` itself): no second read.
    changed = session.execute(
        update(Override)
        .where(col(Override.id) == override.id)
        .where(col(Override.state) == override.state)
        .where(col(Override.version) == override.version)
        .values(**values)
        .returning(Override)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).scalar_one_or_none()
    if changed is None:
        raise Conflict("The override was changed concurrently; reload it and try again.")
    after = snapshot(override)
    if moved is not None:
        after["conflict_status"] = moved[1]
    if audit_extra:
        after.update(audit_extra)
    record(
        session,
        actor=actor,
        via=via,
        action=action,
        override_id=override.id,
        before=before,
        after=after,
        comment=comment,
    )
    return override


def _conflict_move(override: Override, changes: dict[str, Any] | None) -> tuple[str | None, str] | None:
    """The conflict's status before and after `changes` if they move it (checked against the table)."""
    if not changes or "conflict" not in changes:
        return None
    old, new = override.conflict_status, conflict_status_of(changes["conflict"])
    if new is None or new not in CONFLICT_TRANSITIONS[old]:
        was, to = (old.value if old else None), (new.value if new else None)
        raise InvalidTransition(f"A conflict in status '{was}' cannot become '{to}'.")
    return (old.value if old else None), new.value


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load(session: Session, override_id: int, *, for_update: bool = False) -> Override:
    query = select(Override).where(Override.id == override_id)
    if for_update:
        query = query.with_for_update()
    override = session.exec(query).first()
    if override is None:
        raise NotFound(f"Override {override_id} does not exist.")
    return override


def find_live(session: Session, target: str, destination: str) -> tuple[int | None, str] | None:
    """The live override for the destination as its id and state (all a 409 names), or None."""
    return session.exec(
        select(Override.id, Override.state).where(
            Override.target == target, Override.destination == destination, col(Override.live).is_(True)
        )
    ).first()


class _Removal(Protocol):
    state: OverrideState
    removal_deadline: datetime | None


def is_overdue(override: _Removal, now: datetime | None = None) -> bool:
    return (
        override.state == OverrideState.removing
        and override.removal_deadline is not None
        and override.removal_deadline < (now or utcnow())
    )


# ---------------------------------------------------------------------------------------------------------------
# Transitions the system makes (the worker calls these; the decisions call `begin_removal` too)


def begin_removal(
    session: Session,
    override: Override,
    reason: EndReason,
    *,
    actor: str,
    via: str | None,
    comment: str | None,
    settings: Settings,
) -> Override:
    """Hand an applied (or possibly applied) override to the worker for removal from mailcow; it ends in
    `END_STATE[reason]` once mailcow is clean."""
    now = utcnow()
    return transition(
        session,
        override,
        OverrideState.removing,
        actor=actor,
        via=via,
        action=f"override.{reason.value}",
        comment=comment,
        changes={
            "end_reason": reason,
            "removal_deadline": now + timedelta(seconds=settings.removal_grace_seconds),
            "next_attempt_at": now,
            "attempts": 0,
            "extension_seconds": None,
            "extension_requested_by": None,
            "extension_requested_by_key": None,
        },
    )


def lapse(session: Session, override: Override) -> Override:
    """Nobody decided within the review window (called by the worker)."""
    return transition(
        session,
        override,
        OverrideState.lapsed,
        actor="system",
        action="override.lapsed",
        comment="nobody decided within the review window",
        changes={"end_reason": EndReason.lapsed},
    )
