"""The remove job: overrides in `removing` leave mailcow — deleted, verified gone, then recorded.

Which rows are ours: the one with our recorded id (if it still holds our destination), and any row at
our destination with exactly our content (an add whose id was never recorded: a crash, or a cancel
while the apply was in flight). Rows of an open conflict are never ours. Only after a fresh read of the
map shows none of them does the override reach its end state; until then it is retried with backoff,
forever, and turns overdue after its removal deadline. A foreign row that an admin let us replace is
restored (same dest, policy, parameters, active) before the end is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from app.core.db import transaction, utcnow
from app.core.errors import AppError, InvalidTransition
from app.core.metrics import WORKER_JOBS
from app.mailcow.client import MailcowClient
from app.mailcow.dest import dest_key
from app.mailcow.errors import MailcowError
from app.mailcow.policy_map import PolicyMap, is_our_content, row_dict
from app.overrides import lifecycle
from app.overrides.models import ConflictStatus, EndReason
from app.worker import store
from app.worker.context import JobContext
from app.worker.failures import Call, describe, given_up, read_map, retry_later
from app.worker.faults import crash_point
from app.worker.release import releasable
from app.worker.store import RELEASED, Job

log = logging.getLogger("app.worker.remove")


@dataclass(frozen=True)
class Plan:
    ids: frozenset[int]  # our rows to delete
    check_dest: bool  # a row at our destination with our content would be ours too
    restore: dict[str, Any] | None  # the foreign row to put back afterwards


def plan_removal(job: Job, current: PolicyMap) -> Plan:
    status = job.conflict_status
    snapshot = (job.conflict or {}).get("row") if job.conflict else None
    if status in (ConflictStatus.open, ConflictStatus.abandoned):
        return Plan(frozenset(), False, None)  # we never added anything: the row there is foreign
    if status == ConflictStatus.replace:
        # The admin said replace, but the apply never recorded deleting the foreign row. If it is gone,
        # we (probably) deleted it; our own row is only ever added after that was recorded.
        foreign_there = isinstance(snapshot, dict) and int(snapshot.get("id", 0)) in current.by_id
        return Plan(frozenset(), False, None if foreign_there else snapshot)
    if status == ConflictStatus.restoring:
        return Plan(frozenset(), False, snapshot)  # ours is gone already (recorded)
    ids = set()
    if job.mailcow_id is not None:
        row = current.by_id.get(job.mailcow_id)
        if row is not None and dest_key(row.dest) == dest_key(job.destination):
            ids.add(row.id)
    # A row at our destination with our content is ours only if we ever sent an add for it (recorded, or
    # outstanding); otherwise it is a human's identical row, and never touched.
    ours_possible = job.mailcow_id is not None or job.add_sent_at is not None
    at_dest = current.at(job.destination)
    if ours_possible and at_dest is not None and is_our_content(at_dest, job.destination, job.policy, job.parameters):
        ids.add(at_dest.id)
    return Plan(frozenset(ids), ours_possible, snapshot if status == ConflictStatus.replaced else None)


def _landing_window(ctx: JobContext) -> timedelta:
    """How long after it was sent an unanswered add may still land in mailcow."""
    return timedelta(seconds=ctx.settings.mailcow_add_settle_seconds)


def _add_may_still_land(ctx: JobContext, job: Job, plan: Plan) -> bool:
    """Nothing of ours is in the map, but an add went out recently and its answer never came back (the
    override was cancelled or revoked before the apply was recorded, or a re-apply failed): mailcow may
    still commit it. Recording the end now would leave that row behind, active, owned by nobody."""
    return (
        not plan.ids
        and plan.check_dest
        and job.add_sent_at is not None
        and utcnow() - job.add_sent_at < _landing_window(ctx)
    )


def leftovers(job: Job, plan: Plan, current: PolicyMap) -> list[int]:
    """Our rows still in the map (after the delete)."""
    left = {row_id for row_id in plan.ids if row_id in current.by_id}
    at_dest = current.at(job.destination)
    if plan.check_dest and at_dest is not None and is_our_content(at_dest, job.destination, job.policy, job.parameters):
        left.add(at_dest.id)
    return sorted(left)


async def remove_batch(ctx: JobContext, client: MailcowClient, jobs: list[Job]) -> None:
    """Remove claimed overrides of one target."""
    crash_point("after_remove_claim")
    before = await read_map(ctx, client, jobs, "remove")
    if before is None:
        return
    plans = {job.id: plan_removal(job, before) for job in jobs}
    settling = [job for job in jobs if _add_may_still_land(ctx, job, plans[job.id])]
    for job in settling:
        wait = (job.add_sent_at + _landing_window(ctx) - utcnow()).total_seconds() if job.add_sent_at else 0.0
        await retry_later(ctx, job, "remove", "an add sent moments ago may still land in mailcow", delay=max(wait, 0.1))
    jobs = [job for job in jobs if job not in settling]
    delete_ids = sorted(set().union(*(plan.ids for plan in plans.values())))
    after = before
    if delete_ids:
        try:
            await client.delete_policies(delete_ids)
            crash_point("after_delete")
            after = PolicyMap(await client.list_policies())  # verify: mailcow "deletes" unknown ids too
        except MailcowError as exc:
            for job in jobs:
                if plans[job.id].ids:
                    await retry_later(ctx, job, "remove", exc)
            jobs = [job for job in jobs if not plans[job.id].ids]
    removed: list[tuple[Job, list[int], dict[str, Any]]] = []
    for job in jobs:
        plan = plans[job.id]
        left = leftovers(job, plan, after)
        if left:
            await retry_later(ctx, job, "remove", f"mailcow still lists row(s) {left} after deleting them")
            continue
        restored: dict[str, Any] = {}
        if plan.restore is not None:
            outcome = await _restore(ctx, client, job, plan.restore, after)
            if outcome is None:
                continue
            restored = outcome
        removed.append((job, sorted(plan.ids), restored))
    if not removed:
        return
    crash_point("before_record_removal")
    try:
        done = await ctx.db(_record_removed, ctx.engine, removed, ctx.owner)
    except AppError:  # one override refused by the state machine must not hold back the others
        log.warning("recording %d removals together failed; recording them one by one", len(removed))
        done = [(await ctx.db(_record_removed, ctx.engine, [item], ctx.owner))[0] for item in removed]
    for recorded in done:
        WORKER_JOBS.labels("remove", "removed" if recorded else "superseded").inc()


async def _restore(
    ctx: JobContext, client: MailcowClient, job: Job, snapshot: dict[str, Any], current: PolicyMap
) -> dict[str, Any] | None:
    """Put the replaced foreign row back; never overwrite a row someone else put there meanwhile."""
    if job.conflict_status != ConflictStatus.restoring and not await ctx.db(
        _record_restoring, ctx.engine, job, ctx.owner
    ):
        return None
    dest, policy, parameters = str(snapshot["dest"]), str(snapshot["policy"]), str(snapshot.get("parameters", ""))
    active = int(snapshot.get("active", 1))
    at_dest = current.at(dest)
    if at_dest is not None and not is_our_content(at_dest, dest, policy, parameters):
        return {"restore_skipped": row_dict(at_dest), "reason": "another row holds the destination now"}
    try:
        row = at_dest  # an earlier attempt re-added it already
        if row is None:
            # With its `active` flag in the same call: an inactive original added active and edited back
            # afterwards would apply to mail in between (Postfix reads the map on every delivery).
            await client.add_policy(dest, policy, parameters, active=active == 1)
            crash_point("after_restore")
            row = await client.find_policy(dest)
        if row is None:
            await retry_later(ctx, job, "remove", f"the restored row for {dest} is not in the map")
            return None
        if (active == 1) != (row.active == 1):
            # Only a row left by an older version (which added active, then edited): set the flag back.
            await client.edit_policy(row.id, active=1 if active == 1 else 0)
            row = await client.get_policy(row.id)
            if row is None or (active == 1) != (row.active == 1):
                await retry_later(ctx, job, "remove", f"the restored row for {dest} does not read back as it was")
                return None
    except (MailcowError, ValueError) as exc:
        if not await given_up(ctx, job, "remove", exc, Call.restore):
            return None
        # mailcow's add refuses some dests its edit form accepted (e.g. `.sub.example`): say so, go on.
        reason = str(exc) if isinstance(exc, ValueError) else describe(exc)
        log.error("override %s: could not restore the replaced row %s: %s", job.id, snapshot, reason)
        return {"restore_failed": snapshot, "reason": reason}
    return {"restored": row_dict(row)}


def _record_restoring(engine: Engine, job: Job, owner: str) -> bool:
    with transaction(engine) as session:
        override = store.held(session, job, owner)
        if override is None:
            return False
        lifecycle.update_in_place(
            session,
            override,
            actor="system",
            action="override.conflict_restoring",
            comment="our row is gone from mailcow; restoring the row it replaced",
            changes={"conflict": {**(override.conflict or {}), "status": ConflictStatus.restoring.value}},
        )
        return True


def _record_removed(engine: Engine, removed: list[tuple[Job, list[int], dict[str, Any]]], owner: str) -> list[bool]:
    with transaction(engine) as session:
        return [_removed_in(session, job, owner, deleted, restored) for job, deleted, restored in removed]


def _removed_in(session: Session, job: Job, owner: str, deleted: list[int], restored: dict[str, Any]) -> bool:
    override = store.held(session, job, owner)
    if override is None:
        return False
    reason = override.end_reason
    if reason not in lifecycle.END_STATE:
        raise InvalidTransition(f"override {job.id} is being removed without a reason to end ({reason})")
    # A failed apply keeps its error for the API; any other end clears the removal's retry errors.
    keep_error = reason == EndReason.apply_failed
    end = lifecycle.END_STATE[reason]
    # After an expired, revoked or remediated end the destination is watched for mail deferred for TLS again.
    watched = end in lifecycle.WATCHED_ENDS and releasable(override.destination)
    changes: dict[str, Any] = {**RELEASED, "next_attempt_at": None, "queue_due_at": utcnow() if watched else None}
    if not keep_error:
        changes["last_error"] = None
    if restored and override.conflict:
        status = ConflictStatus.restored if "restored" in restored else ConflictStatus.not_restored
        changes["conflict"] = {**override.conflict, "status": status.value, **restored}
    what = f"deleted row(s) {deleted} from mailcow" if deleted else "no row of ours was left in mailcow"
    lifecycle.transition(
        session,
        override,
        end,
        actor="system",
        action="override.removed",
        comment=f"{what} ({reason})",
        changes=changes,
        audit_extra={"deleted_ids": deleted, **restored, "worker": owner},
    )
    return True
