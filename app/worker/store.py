"""The worker's database side: claim due overrides, record outcomes, release and back off. The worker
writes its bookkeeping on an override row — the lease, attempts, the add in flight, the next attempt,
the remediation watch's count, the queue pass's release record (`queue_release`, its status checked
against `lifecycle.QUEUE_RELEASE_TRANSITIONS`) and due time, the refreshed queue evidence — here and
nowhere else (the API only makes waiting jobs due when an admin resumes a target); the state only ever
changes through `app.overrides.lifecycle`.

A claim is a short committed transaction that leases rows to one worker (`lease_owner`,
`lease_until`); on PostgreSQL the due rows are read with `FOR UPDATE SKIP LOCKED`, so two workers
never claim the same row, and on SQLite `BEGIN IMMEDIATE` serialises the claims. A claim does not bump
the override's version (its ETag stays valid); it moves `next_attempt_at` to the lease's end, so a
worker killed mid-job leaves a row that becomes due again when its lease runs out.

Every outcome is recorded in a second short transaction (a batch's successes together) that first
re-reads each row under a lock and checks that it is still in the expected state AND still leased by
this worker (`held`, the one guard every record starts with); then the state machine in
`app.overrides.lifecycle` compare-and-sets it and queues the audit entry in the same transaction. If a
human acted meanwhile (a cancel turns `approved` into `removing`), the record is skipped and the lease
dropped: the remove job cleans up whatever the interrupted job left in mailcow.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, update
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.audit.service import record
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.overrides import lifecycle
from app.overrides.models import (
    ConflictStatus,
    EndReason,
    Override,
    OverrideState,
    QueueReleaseStatus,
    conflict_status_of,
    queue_release_status_of,
)
from app.targets.models import MailcowTarget

RELEASED: dict[str, Any] = {"lease_owner": None, "lease_until": None}
# Overrides the queue pass and the remediation watch look at: active ones, and ended ones being watched.
QUEUE_STATES = (OverrideState.active, *sorted(lifecycle.WATCHED_ENDS))


@dataclass(frozen=True)
class Job:
    """A claimed override, copied out of the claim's transaction."""

    id: int
    state: OverrideState
    target: str
    destination: str
    policy: str
    parameters: str
    mailcow_id: int | None
    attempts: int
    conflict: dict[str, Any] | None
    end_reason: EndReason | None
    due_at: datetime | None
    add_sent_at: datetime | None  # an add sent whose outcome is not recorded; it may land late

    @property
    def first_attempt(self) -> bool:
        """No add is outstanding, so no row in mailcow can be an unrecorded one of ours."""
        return self.add_sent_at is None

    @property
    def conflict_status(self) -> ConflictStatus | None:
        return conflict_status_of(self.conflict)


def backoff(settings: Settings, attempts: int) -> float:
    """Exponential, capped, with ±20 % jitter so that workers do not retry in lockstep."""
    base = min(settings.retry_max_seconds, settings.retry_initial_seconds * 2.0 ** min(attempts, 20))
    return float(base * random.uniform(0.8, 1.2))  # noqa: S311 (jitter, not crypto)


def _lease_due(
    session: Session,
    due: Any,
    which: Any,
    owner: str,
    lease_seconds: float,
    limit: int,
    exclude_targets: set[str] | frozenset[str],
) -> list[Override]:
    """Lease the rows `which` selects whose `due` time has come and whose lease is free, oldest due first:
    the lease and the due time both move to the lease's end, so a worker killed mid-job leaves the job
    due again when its lease runs out. The rows are locked (PostgreSQL, skipping those another worker
    holds) or the database is (SQLite), and the update repeats the conditions: one statement leases all."""
    now = utcnow()
    lease_until = now + timedelta(seconds=lease_seconds)
    free = or_(col(Override.lease_until).is_(None), col(Override.lease_until) < now)
    query = select(Override).where(which, due.is_not(None), due <= now, free)
    if exclude_targets:
        query = query.where(col(Override.target).not_in(sorted(exclude_targets)))
    query = query.order_by(due, col(Override.id)).limit(limit)
    rows = list(session.exec(query.with_for_update(skip_locked=True)).all())
    if rows:
        session.execute(
            update(Override)
            .where(col(Override.id).in_([row.id for row in rows]), which, free)
            .values({"lease_owner": owner, "lease_until": lease_until, due.key: lease_until})
            .execution_options(synchronize_session=False)
        )
    return rows


def claim(
    engine: Engine,
    state: OverrideState,
    owner: str,
    *,
    lease_seconds: float,
    limit: int,
    exclude_targets: set[str] | frozenset[str] = frozenset(),
) -> list[Job]:
    """Lease up to `limit` due overrides in `state` (approved → apply, removing → remove)."""
    with transaction(engine) as session:
        rows = _lease_due(
            session,
            col(Override.next_attempt_at),
            col(Override.state) == state,
            owner,
            lease_seconds,
            limit,
            exclude_targets,
        )
        return [
            Job(
                id=row.id or 0,
                state=state,
                target=row.target,
                destination=row.destination,
                policy=row.policy,
                parameters=row.parameters,
                mailcow_id=row.mailcow_id,
                attempts=row.attempts,
                conflict=row.conflict,
                end_reason=row.end_reason,
                due_at=row.next_attempt_at,
                add_sent_at=row.add_sent_at,
            )
            for row in rows
        ]


def _leased(session: Session, override_ids: list[int], owner: str, **values: Any) -> int:
    """Change overrides this worker still holds the lease of; a row another worker (or nobody) holds
    now is left as it is. Returns how many rows changed."""
    result = session.execute(
        update(Override)
        .where(col(Override.id).in_(override_ids), col(Override.lease_owner) == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def renew(engine: Engine, override_ids: list[int], owner: str, lease_seconds: float) -> int:
    """Extend this worker's leases on jobs still in flight (a slow mailcow must not let another worker
    take them over mid-call). Rows already recorded or released are not ours any more and stay as they are."""
    if not override_ids:
        return 0
    with transaction(engine) as session:
        lease_until = utcnow() + timedelta(seconds=lease_seconds)
        return _leased(session, override_ids, owner, lease_until=lease_until, next_attempt_at=lease_until)


def owned(session: Session, override_id: int, owner: str, state: OverrideState) -> Override | None:
    """The override, locked, if it is still in `state` and leased by `owner`; else None."""
    override = session.exec(select(Override).where(Override.id == override_id).with_for_update()).first()
    if override is None or override.state != state or override.lease_owner != owner:
        return None
    return override


def held(session: Session, job: Job, owner: str) -> Override | None:
    """The job's override, locked, if it is still in the state it was claimed in and leased by this worker.
    Else None, and the lease is let go: a human acted meanwhile (a cancel, a revoke), so the outcome is
    not recorded and whatever the override needs now is due at once. Every record of an outcome starts here."""
    override = owned(session, job.id, owner, job.state)
    if override is None:
        drop_lease(session, job.id, owner)
    return override


def drop_lease(session: Session, override_id: int, owner: str, **also: Any) -> None:
    """Let go of an override whose state changed under us (a cancel, a revoke): whatever job it needs
    now is due at once, not when our lease would have run out."""
    _leased(session, [override_id], owner, **RELEASED, next_attempt_at=utcnow(), **also)


def mark_add_sent(engine: Engine, override_ids: list[int], owner: str, state: OverrideState) -> list[int]:
    """Record, before the adds go out, that they are about to: from now on a row with our content at
    the destination may be ours (and may still appear late). Returns the ids still ours to add for;
    an override cancelled meanwhile is left alone (its removal is due at once)."""
    with transaction(engine) as session:
        ours = [override.id or 0 for override in _still_ours(session, override_ids, owner, state)]
        if ours:
            _leased(session, ours, owner, add_sent_at=utcnow())
        for override_id in set(override_ids) - set(ours):
            drop_lease(session, override_id, owner)
        return ours


def set_add_sent(engine: Engine, override_ids: list[int], owner: str, at: datetime | None) -> None:
    """`at`: adds without a clear answer, which may land up to TLSO_MAILCOW_ADD_SETTLE_SECONDS later;
    None: mailcow refused the add on its only attempt, so nothing of it can land."""
    with transaction(engine) as session:
        _leased(session, override_ids, owner, add_sent_at=at)


def _still_ours(session: Session, override_ids: list[int], owner: str, state: OverrideState) -> list[Override]:
    return list(
        session.exec(
            select(Override)
            .where(col(Override.id).in_(override_ids))
            .where(col(Override.state) == state, col(Override.lease_owner) == owner)
            .with_for_update()
        ).all()
    )


def release(engine: Engine, settings: Settings, job: Job, owner: str, error: str, delay: float | None = None) -> float:
    """The attempt failed: drop the lease, count it and schedule the next one. Returns the delay."""
    with transaction(engine) as session:
        override = held(session, job, owner)
        if override is None:
            return 0.0
        attempts = override.attempts + 1
        wait = backoff(settings, attempts - 1) if delay is None else delay
        now = utcnow()
        # A failed apply being cleaned up keeps the apply's error: that is what the API must show.
        keep = override.state == OverrideState.removing and override.end_reason == EndReason.apply_failed
        _leased(
            session,
            [job.id],
            owner,
            **RELEASED,
            attempts=attempts,
            next_attempt_at=now + timedelta(seconds=wait),
            last_error=override.last_error if keep else error[:1000],
        )
        if lifecycle.is_overdue(override, now) and not _recorded(session, job.id, "override.removal_overdue"):
            # Once, so that the alarm reaches the trail (and the notification sinks) without flooding them.
            record(
                session,
                actor="system",
                action="override.removal_overdue",
                override_id=job.id,
                after={"state": override.state.value, "removal_deadline": override.removal_deadline},
                comment=f"still not removed from mailcow: {error[:300]}",
            )
        return wait


def _recorded(session: Session, override_id: int, action: str) -> bool:
    found = session.exec(
        select(AuditEvent.seq).where(AuditEvent.override_id == override_id, AuditEvent.action == action).limit(1)
    ).first()
    return found is not None


def claim_active(engine: Engine, override_id: int, owner: str, lease_seconds: float) -> bool:
    """Lease an active override for a reconcile repair (so that a removal waits for it)."""
    with transaction(engine) as session:
        now = utcnow()
        result = session.execute(
            update(Override)
            .where(col(Override.id) == override_id, col(Override.state) == OverrideState.active)
            .where(or_(col(Override.lease_until).is_(None), col(Override.lease_until) < now))
            .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release_active(engine: Engine, override_id: int, owner: str) -> None:
    with transaction(engine) as session:
        drop_lease(session, override_id, owner)


# ---------------------------------------------------------------------------------------------------------------
# The remediation watch's bookkeeping (it does not bump the version: a reviewer's ETag stays valid)


def claim_recheck(engine: Engine, override_id: int, seen: datetime | None) -> bool:
    """Compare-and-set on `last_checked_at`, so two workers do not diagnose the same override at once (an
    active one, or one watched after its end)."""
    with transaction(engine) as session:
        guard = col(Override.last_checked_at).is_(None) if seen is None else col(Override.last_checked_at) == seen
        result = session.execute(
            update(Override)
            .where(col(Override.id) == override_id, col(Override.state).in_(QUEUE_STATES), guard)
            .values(last_checked_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def count_clean_checks(session: Session, override_id: int, checks: int) -> None:
    """The clean diagnoses in a row so far (0: the last one failed)."""
    session.execute(
        update(Override)
        .where(col(Override.id) == override_id)
        .values(clean_checks=checks)
        .execution_options(synchronize_session=False)
    )


# ---------------------------------------------------------------------------------------------------------------
# The queue pass (app/worker/release.py): the release of an active override's deferred mail, its check, the
# watch after the end. Leased like the other jobs, due by `queue_due_at`; it does not bump the version.


@dataclass(frozen=True)
class QueueJob:
    """An override whose queue pass is due, copied out of the claim's transaction."""

    id: int
    state: OverrideState
    target: str
    destination: str
    policy: str
    queue_release: dict[str, Any] | None
    ended_at: datetime | None
    due_at: datetime | None

    @property
    def status(self) -> QueueReleaseStatus | None:
        return queue_release_status_of(self.queue_release)


def claim_queue(
    engine: Engine,
    owner: str,
    *,
    lease_seconds: float,
    limit: int,
    exclude_targets: set[str] | frozenset[str] = frozenset(),
) -> list[QueueJob]:
    """Lease up to `limit` overrides whose queue pass is due (active ones, and ended ones being watched)."""
    with transaction(engine) as session:
        rows = _lease_due(
            session,
            col(Override.queue_due_at),
            col(Override.state).in_(QUEUE_STATES),
            owner,
            lease_seconds,
            limit,
            exclude_targets,
        )
        return [
            QueueJob(
                id=row.id or 0,
                state=row.state,
                target=row.target,
                destination=row.destination,
                policy=row.policy,
                queue_release=row.queue_release,
                ended_at=row.ended_at,
                due_at=row.queue_due_at,
            )
            for row in rows
        ]


def renew_queue(engine: Engine, override_ids: list[int], owner: str, lease_seconds: float) -> int:
    """Extend this worker's leases on queue passes still in flight."""
    if not override_ids:
        return 0
    with transaction(engine) as session:
        lease_until = utcnow() + timedelta(seconds=lease_seconds)
        return _leased(session, override_ids, owner, lease_until=lease_until, queue_due_at=lease_until)


def note_queue_release(engine: Engine, job: QueueJob, owner: str, value: dict[str, Any]) -> bool:
    """Write the release's record while keeping the lease (what is about to be handed to `deliver`, so that a
    worker taking over after a kill audits it too); its status is checked against its table. False (nothing
    written) if the lease is not this worker's any more."""
    with transaction(engine) as session:
        override = session.exec(select(Override).where(Override.id == job.id).with_for_update()).first()
        if override is None or override.lease_owner != owner:
            return False  # (a revoke meanwhile keeps our lease: the release goes on, its removal waits for it)
        lifecycle.check_queue_release_move(override.queue_release_status, QueueReleaseStatus(value["status"]))
        return _leased(session, [job.id], owner, queue_release=value) == 1


@dataclass(frozen=True)
class QueueAudit:
    action: str
    comment: str
    after: dict[str, Any]


def move_queue_release(
    engine: Engine,
    job: QueueJob,
    owner: str,
    value: dict[str, Any] | None,
    due_at: datetime | None,
    audits: Sequence[QueueAudit] = (),
    queue: dict[str, Any] | None = None,
) -> bool:
    """Record a queue pass: the release's new value (its status checked against its table under the row's
    lock), when the next pass is due, its audit entries and (the check) the fresh queue evidence, in one
    transaction; the lease is let go. False
    (nothing written) if the lease is not this worker's any more."""
    with transaction(engine) as session:
        override = session.exec(select(Override).where(Override.id == job.id).with_for_update()).first()
        if override is None or override.lease_owner != owner:
            return False
        values: dict[str, Any] = {**RELEASED, "queue_due_at": due_at}
        if value is not None:
            lifecycle.check_queue_release_move(override.queue_release_status, QueueReleaseStatus(value["status"]))
            values["queue_release"] = value
        if queue is not None:
            values["queue"] = queue  # what the queue holds for the destination now (app/overrides/stuck.py)
        if override.state == OverrideState.removing:
            values["next_attempt_at"] = utcnow()  # revoked meanwhile: its removal waited for this lease
        _leased(session, [job.id], owner, **values)
        for audit in audits:
            record(
                session,
                actor="system",
                action=audit.action,
                override_id=job.id,
                after=audit.after,
                comment=audit.comment,
            )
        return True


def queue_later(engine: Engine, job: QueueJob, owner: str, delay: float) -> None:
    """The queue pass failed (mailcow could not say or do it): let go, due again after `delay` seconds."""
    move_queue_release(engine, job, owner, None, utcnow() + timedelta(seconds=delay))


def record_queue_evidence(
    engine: Engine, evidence: dict[int, dict[str, Any]], watched: tuple[OverrideState, ...]
) -> int:
    """The refresh's queue evidence on each override still in a `watched` state; how many were written. No
    lease is taken (reading the queue decides nothing), and the version stays: no reviewer's If-Match fails."""
    written = 0
    with transaction(engine) as session:
        for override_id, queue in evidence.items():
            result = session.execute(
                update(Override)
                .where(col(Override.id) == override_id, col(Override.state).in_(watched))
                .values(queue=queue)
                .execution_options(synchronize_session=False)
            )
            written += int(result.rowcount)  # type: ignore[attr-defined]
    return written


# ---------------------------------------------------------------------------------------------------------------
# Time-driven transitions (no mailcow call involved)


def expire_due(engine: Engine, settings: Settings, limit: int) -> list[float]:
    """Active overrides whose time is up start their removal. Returns each one's lateness in seconds."""
    with transaction(engine) as session:
        now = utcnow()
        rows = session.exec(
            select(Override)
            .where(col(Override.state) == OverrideState.active, col(Override.expires_at) <= now)
            .order_by(col(Override.expires_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        late = []
        for override in rows:
            late.append((now - override.expires_at).total_seconds() if override.expires_at else 0.0)
            lifecycle.begin_removal(
                session,
                override,
                EndReason.expired,
                actor="system",
                via=None,
                comment="the override's duration is over",
                settings=settings,
            )
        return late


def lapse_due(engine: Engine, limit: int) -> int:
    """Requests nobody decided on within the review window lapse."""
    with transaction(engine) as session:
        now = utcnow()
        rows = session.exec(
            select(Override)
            .where(col(Override.state) == OverrideState.pending, col(Override.review_deadline) <= now)
            .order_by(col(Override.review_deadline))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for override in rows:
            lifecycle.lapse(session, override)
        return len(rows)


def next_due(engine: Engine, targets: list[str], paused: set[str]) -> datetime | None:
    """The earliest time any job becomes due (the worker sleeps until then, or its poll interval)."""
    with transaction(engine) as session:
        attempts = select(func.min(Override.next_attempt_at)).where(
            col(Override.state).in_([OverrideState.approved, OverrideState.removing])
        )
        if paused:
            attempts = attempts.where(col(Override.target).not_in(sorted(paused)))
        candidates = [
            session.exec(attempts).one(),
            session.exec(
                select(func.min(Override.expires_at)).where(col(Override.state) == OverrideState.active)
            ).one(),
            session.exec(
                select(func.min(Override.review_deadline)).where(col(Override.state) == OverrideState.pending)
            ).one(),
        ]
        queue = select(func.min(Override.queue_due_at)).where(col(Override.state).in_(QUEUE_STATES))
        if paused:
            queue = queue.where(col(Override.target).not_in(sorted(paused)))
        candidates.append(session.exec(queue).one())
        live = [name for name in targets if name not in paused]
        if live:
            candidates.append(
                session.exec(
                    select(func.min(MailcowTarget.reconcile_due_at)).where(col(MailcowTarget.name).in_(live))
                ).one()
            )
        if paused:
            candidates.append(
                session.exec(
                    select(func.min(MailcowTarget.paused_until)).where(col(MailcowTarget.name).in_(sorted(paused)))
                ).one()
            )
        due = [value for value in candidates if isinstance(value, datetime)]
        return min(due) if due else None
