"""The apply job: approved overrides become rows in mailcow's TLS policy map, exactly once.

Per target and batch: read the map; for each override decide — add, adopt or conflict; add the rows
(always `active=1`); read the map again to learn their ids (mailcow returns none); record each one
`active` with its id. Adoption is what makes a crash safe: an override whose earlier attempt may have
added its row (`add_sent_at` is set before any add goes out) takes a row with exactly its content as
its own instead of adding a second one. A row for the destination that tlsoverride did not
write is a conflict — also one at the name's transitional form, where mailcow's UI stores `straße.example`
as `strasse.example` — it is snapshotted, never overwritten, and an admin decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.core.errors import AppError
from app.core.metrics import WORKER_JOBS
from app.mailcow.client import MailcowClient, PolicyRow
from app.mailcow.dest import dest_forms, dest_key
from app.mailcow.errors import (
    MailcowAuthError,
    MailcowEmptyResponse,
    MailcowError,
    MailcowProtocolError,
    MailcowRejected,
    MailcowUnavailable,
)
from app.mailcow.policy_map import PolicyMap, is_our_content, row_dict
from app.overrides import lifecycle
from app.overrides.models import ConflictStatus, EndReason, OverrideState
from app.worker import store
from app.worker.context import JobContext
from app.worker.failures import Call, describe, given_up, read_map, retry_later
from app.worker.faults import crash_point
from app.worker.release import releasable
from app.worker.store import RELEASED, Job

log = logging.getLogger("app.worker.apply")

ENTRY_EXISTS = "tls_policy_map_entry_exists"


def adoptable(row: PolicyRow, job: Job) -> bool:
    return is_our_content(row, job.destination, job.policy, job.parameters) and row.active == 1


async def apply_batch(ctx: JobContext, client: MailcowClient, jobs: list[Job]) -> None:
    """Apply claimed overrides of one target."""
    crash_point("after_claim")
    before = await read_map(ctx, client, jobs, "apply")
    if before is None:
        return
    to_add: list[Job] = []
    applied: list[Applied] = []
    for job in jobs:
        # A row in either form of the name is someone's (ours are only ever at `destination` itself).
        existing = before.holding(job.destination)
        if job.conflict_status == ConflictStatus.replace:
            if not await _replace_foreign_row(ctx, client, job, before):
                continue
            existing = None
        if existing is None:
            to_add.append(job)
        elif adoptable(existing, job) and not job.first_attempt:
            applied.append(Applied(job, existing.id, adopted=True))
        else:
            await _conflict(ctx, job, existing)
    if to_add:
        sending = set(
            await ctx.db(store.mark_add_sent, ctx.engine, [job.id for job in to_add], ctx.owner, OverrideState.approved)
        )
        to_add = [job for job in to_add if job.id in sending]  # the others were cancelled meanwhile
    if not to_add:
        await _record_all(ctx, applied)
        return

    async def add(job: Job) -> BaseException | None:
        if job.target in ctx.auth_failed:
            return MailcowAuthError("not sent: the target rejected our key moments ago", target=job.target)
        try:
            await client.add_policy(job.destination, job.policy, job.parameters)
        except (MailcowError, ValueError) as exc:
            return exc
        crash_point("after_add")
        return None

    results = await ctx.gather(add(job) for job in to_add)
    unclear = [job.id for job, result in zip(to_add, results, strict=True) if _may_have_landed(result)]
    if unclear:
        # Those adds went out at some point during the batch (queued behind the concurrency limit, or
        # retried): the time an unanswered one may still land counts from now, not from the batch's start.
        await ctx.db(store.set_add_sent, ctx.engine, unclear, ctx.owner, utcnow())
    if all(isinstance(result, BaseException) and not _entry_exists(result) for result in results):
        after = before  # nothing was added: no need to look again
    else:
        try:
            after = PolicyMap(await client.list_policies())
        except MailcowError as exc:
            # Whatever was added is adopted on the next attempt (add_sent_at is set).
            for job in to_add:
                await retry_later(ctx, job, "apply", exc)
            await _record_all(ctx, applied)
            return
    for job, result in zip(to_add, results, strict=True):
        outcome = await _settle(ctx, job, result, after)
        if outcome is not None:
            applied.append(outcome)
    if any(not item.adopted for item in applied):
        crash_point("before_record_apply")
    await _record_all(ctx, applied)


@dataclass(frozen=True)
class Applied:
    job: Job
    row_id: int
    adopted: bool


async def _settle(ctx: JobContext, job: Job, result: BaseException | None, after: PolicyMap) -> Applied | None:
    """What an add came to: applied (recorded with the batch), or a conflict, failure or retry (recorded now)."""
    if result is not None and not _entry_exists(result):
        await _add_failed(ctx, job, result)
        return None
    row = after.at(job.destination)
    if row is None:
        await retry_later(ctx, job, "apply", "mailcow confirmed the add, but the row is not in the map")
        return None
    if result is None:
        if adoptable(row, job):
            return Applied(job, row.id, adopted=False)
        await retry_later(ctx, job, "apply", f"the row for {job.destination} changed right after it was added")
        return None
    # "entry exists": our own row if an earlier attempt (or a retried HTTP call) may have added it.
    retried = isinstance(result, MailcowRejected) and result.retried
    if adoptable(row, job) and (retried or not job.first_attempt):
        return Applied(job, row.id, adopted=True)
    await _conflict(ctx, job, row)
    return None


def _may_have_landed(result: BaseException | None) -> bool:
    return isinstance(result, MailcowUnavailable | MailcowProtocolError) or (
        isinstance(result, MailcowError) and result.attempts > 1
    )


def _entry_exists(error: BaseException) -> bool:
    return isinstance(error, MailcowRejected) and error.msg_key == ENTRY_EXISTS


async def _add_failed(ctx: JobContext, job: Job, error: BaseException) -> None:
    definite = isinstance(error, ValueError) or (
        isinstance(error, MailcowRejected | MailcowAuthError | MailcowEmptyResponse) and error.attempts == 1
    )
    if definite:
        # mailcow answered the only attempt with "not added" (or nothing was sent): no row of it can
        # appear later. After a retry, an earlier attempt whose answer was lost may still commit.
        await ctx.db(store.set_add_sent, ctx.engine, [job.id], ctx.owner, None)
    if await given_up(ctx, job, "apply", error, Call.add, attempts=job.attempts + 1):
        await _failed(ctx, job, describe(error))


async def _replace_foreign_row(ctx: JobContext, client: MailcowClient, job: Job, current: PolicyMap) -> bool:
    """An admin chose "replace": delete the foreign row (its snapshot is restored at the end)."""
    conflict = job.conflict or {}
    snapshot: dict[str, Any] = dict(conflict.get("row") or {})
    row = current.by_id.get(int(snapshot.get("id", 0)))
    try:
        if row is not None and dest_key(row.dest) in dest_forms(job.destination):
            await client.delete_policies([row.id])
            crash_point("after_replace_delete")
            if await client.get_policy(row.id) is not None:
                await retry_later(ctx, job, "apply", f"foreign row {row.id} is still there after the delete")
                return False
            snapshot = row_dict(row)  # what was there just now is what comes back at the end
        else:
            other = current.holding(job.destination)
            if other is not None:
                # Yet another row holds the destination now: the admin decided about a different one.
                await _conflict(ctx, job, other)
                return False
    except MailcowError as exc:
        await retry_later(ctx, job, "apply", exc)
        return False
    return await ctx.db(_record_replaced, ctx.engine, job, ctx.owner, snapshot)


# ---------------------------------------------------------------------------------------------------------------
# Recording outcomes (compare-and-set through the state machine, audit row in the same transaction)


async def _record_all(ctx: JobContext, applied: list[Applied]) -> None:
    """Record a batch's applied overrides in one transaction (each with its audit row); one by one if that fails."""
    if not applied:
        return
    try:
        done = await ctx.db(_record_applied, ctx.engine, applied, ctx.owner)
    except AppError:  # one override refused by the state machine must not hold back the others
        log.warning("recording %d applied overrides together failed; recording them one by one", len(applied))
        done = [(await ctx.db(_record_applied, ctx.engine, [item], ctx.owner))[0] for item in applied]
    for item, recorded in zip(applied, done, strict=True):
        outcome = "superseded" if not recorded else "adopted" if item.adopted else "applied"
        WORKER_JOBS.labels("apply", outcome).inc()


async def _conflict(ctx: JobContext, job: Job, row: PolicyRow) -> None:
    await ctx.db(_record_conflict, ctx.engine, job, ctx.owner, row)
    WORKER_JOBS.labels("apply", "conflict").inc()
    log.warning(
        "override %s: %s on %s already has a TLS policy row (id %s) that tlsoverride did not create; "
        "left untouched, an admin decides (resolve-conflict)",
        job.id,
        job.destination,
        job.target,
        row.id,
    )


async def _failed(ctx: JobContext, job: Job, reason: str) -> None:
    await ctx.db(_record_failed, ctx.engine, ctx.settings, job, ctx.owner, reason)
    WORKER_JOBS.labels("apply", "failed").inc()
    log.error("override %s could not be applied to %s: %s", job.id, job.target, reason)


def _record_applied(engine: Engine, applied: list[Applied], owner: str) -> list[bool]:
    with transaction(engine) as session:
        return [_applied_in(session, item.job, owner, item.row_id, item.adopted) for item in applied]


def _applied_in(session: Session, job: Job, owner: str, row_id: int, adopted: bool) -> bool:
    override = store.held(session, job, owner)
    if override is None:  # cancelled meanwhile: the remove job cleans up
        return False
    now = utcnow()
    how = f"adopted row {row_id}, added by an interrupted attempt" if adopted else f"added as row {row_id}"
    lifecycle.transition(
        session,
        override,
        OverrideState.active,
        actor="system",
        action="override.applied",
        comment=f"{how} on {override.target}",
        changes={
            **RELEASED,
            "applied_at": now,
            "expires_at": now + timedelta(seconds=override.duration_seconds),
            "mailcow_id": row_id,
            "add_sent_at": None,  # the add's outcome is known now
            "next_attempt_at": None,
            "attempts": 0,
            "last_error": None,
            # Its destination's deferred mail is released in this same pass (app/worker/release.py).
            "queue_due_at": now if releasable(override.destination) else None,
        },
        audit_extra={"adopted": adopted, "attempts": override.attempts + 1, "worker": owner},
    )
    return True


def _record_conflict(engine: Engine, job: Job, owner: str, row: PolicyRow) -> None:
    with transaction(engine) as session:
        override = store.held(session, job, owner)
        if override is None:
            return
        snapshot = row_dict(row)
        lifecycle.update_in_place(
            session,
            override,
            actor="system",
            action="override.conflict",
            comment=(
                f"{row.dest} already has a TLS policy row (id {row.id}: {row.policy} {row.parameters}".rstrip()
                + ") that tlsoverride did not create; it was left untouched. An admin resolves the conflict: "
                "replace it (restored when the override ends) or abandon the override."
            ),
            changes={
                **RELEASED,
                "conflict": {"status": ConflictStatus.open.value, "row": snapshot, "detected_at": utcnow().isoformat()},
                "next_attempt_at": None,  # nothing to do until an admin decides
                "last_error": f"conflict with mailcow row {row.id}",
            },
            audit_extra={"conflict": snapshot},
        )


def _record_replaced(engine: Engine, job: Job, owner: str, snapshot: dict[str, Any]) -> bool:
    with transaction(engine) as session:
        override = store.held(session, job, owner)
        if override is None:
            return False
        if override.conflict_status != ConflictStatus.replace:
            store.drop_lease(session, job.id, owner)
            return False
        lifecycle.update_in_place(
            session,
            override,
            actor="system",
            action="override.conflict_replaced",
            comment=f"deleted the foreign row {snapshot.get('id')} as an admin decided; it is restored at the end",
            changes={
                "conflict": {**(override.conflict or {}), "status": ConflictStatus.replaced.value, "row": snapshot},
            },
            audit_extra={"replaced": snapshot},
        )
        return True


def _record_failed(engine: Engine, settings: Settings, job: Job, owner: str, reason: str) -> None:
    with transaction(engine) as session:
        override = store.held(session, job, owner)
        if override is None:
            return
        replaced = override.conflict_status in (ConflictStatus.replace, ConflictStatus.replaced)
        if replaced or override.add_sent_at is not None:
            # We may have deleted the foreign row an admin let us replace, or an add whose answer was lost
            # may have landed: the removal cleans up (and restores), then the override ends as `failed`.
            why = "restoring the row it was to replace" if replaced else "removing whatever an earlier add left"
            lifecycle.begin_removal(
                session,
                override,
                EndReason.apply_failed,
                actor="system",
                via=None,
                comment=f"mailcow refused the row: {reason}; {why}",
                settings=settings,
            )
            store.drop_lease(session, job.id, owner, last_error=reason[:1000])
            return
        lifecycle.transition(
            session,
            override,
            OverrideState.failed,
            actor="system",
            action="override.apply_failed",
            comment=f"mailcow refused the row: {reason}",
            changes={
                **RELEASED,
                "end_reason": EndReason.apply_failed,
                "next_attempt_at": None,
                "last_error": reason[:1000],
            },
        )
