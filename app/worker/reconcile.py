"""The reconcile job: compare each target's live map with the active overrides, on a timer.

Our row missing or edited by hand is drift: recorded once per distinct finding (audit
`override.drift`, the override's `drift` field, a metric), then either only reported
(`TLSO_DRIFT_ACTION=alert`, the default) or repaired (`reapply`: add the row again, or edit it back).
A row that someone re-added with exactly our content is taken as ours again. Rows that no override
owns are counted as inventory and never touched.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from app.core.db import transaction, utcnow
from app.core.metrics import DRIFT_EVENTS, WORKER_JOBS
from app.mailcow.client import MailcowClient, PolicyRow
from app.mailcow.errors import MailcowError
from app.mailcow.policy_map import PolicyMap, drift_of, is_our_content, same_drift
from app.overrides import lifecycle
from app.overrides.models import Override, OverrideState
from app.targets.service import Wanted, finish_reconcile, owning_overrides
from app.worker import store
from app.worker.context import JobContext
from app.worker.failures import describe, pause_if_refused
from app.worker.faults import crash_point

log = logging.getLogger("app.worker.reconcile")


async def reconcile_target(ctx: JobContext, client: MailcowClient, target: str) -> None:
    """One pass over one target (the caller holds the target's reconcile lease)."""
    interval = timedelta(seconds=ctx.settings.reconcile_interval_seconds)
    # Read the overrides BEFORE the map: an override applied in between is not active in this snapshot,
    # so its fresh row can never look like drift (the reverse order would report it missing).
    overrides = await ctx.db(_owning, ctx.engine, target)
    try:
        current = PolicyMap(await client.list_policies())
    except MailcowError as exc:
        await pause_if_refused(ctx, target, exc)
        retry_in = min(interval, timedelta(seconds=60))
        await ctx.db(finish_reconcile, ctx.engine, target, ctx.owner, next_in=retry_in, error=describe(exc))
        WORKER_JOBS.labels("reconcile", "retry").inc()
        log.warning("reconcile of %s failed: %s", target, describe(exc))
        return
    owned_ids = {o.mailcow_id for o in overrides if o.mailcow_id is not None}
    for wanted in overrides:
        if wanted.state == OverrideState.active:
            await _check(ctx, client, target, wanted, current)
    owned = sum(1 for row in current.rows if row.id in owned_ids)
    foreign = len(current.rows) - owned
    await ctx.db(finish_reconcile, ctx.engine, target, ctx.owner, next_in=interval, owned=owned, foreign=foreign)
    WORKER_JOBS.labels("reconcile", "done").inc()


def _owning(engine: Engine, target: str) -> list[Wanted]:
    with Session(engine) as session:
        return owning_overrides(session, target)


async def _check(ctx: JobContext, client: MailcowClient, target: str, wanted: Wanted, current: PolicyMap) -> None:
    drift = drift_of(wanted, current)
    if drift is None:
        if wanted.drift:
            await ctx.db(_record, ctx.engine, wanted, "override.drift_resolved", "the row is as applied again")
        return
    if drift["kind"] == "recreated":
        # Someone re-added exactly our row: it is ours again (and is what the removal deletes).
        found = drift["found"]
        comment = f"our row was re-created as row {found['id']} with the same content; taken as ours"
        await ctx.db(_record, ctx.engine, wanted, "override.drift", comment, mailcow_id=int(found["id"]), audit=drift)
        DRIFT_EVENTS.labels(target, "recreated").inc()
        return
    if not same_drift(wanted.drift, drift):
        stamped = {**drift, "detected_at": utcnow().isoformat(), "action": ctx.settings.drift_action}
        recorded = await ctx.db(
            _record, ctx.engine, wanted, "override.drift", _explain(drift), drift=stamped, audit=drift
        )
        if not recorded:
            return
        DRIFT_EVENTS.labels(target, str(drift["kind"])).inc()
        log.warning("override %s on %s: drift (%s): %s", wanted.id, target, drift["kind"], _explain(drift))
    if ctx.settings.drift_action == "reapply" and drift["kind"] in ("missing", "edited"):
        await _reapply(ctx, client, target, wanted, drift)


def _explain(drift: dict[str, Any]) -> str:
    kind = drift["kind"]
    if kind == "missing":
        return "our row is gone from mailcow"
    if kind == "replaced":
        found = drift["found"]
        return f"our row is gone and row {found['id']} ({found['policy']} {found['parameters']}) holds the destination"
    if kind == "edited":
        return f"our row was edited by hand: {', '.join(drift['fields'])} differ"
    return str(kind)


async def _reapply(ctx: JobContext, client: MailcowClient, target: str, wanted: Wanted, drift: dict[str, Any]) -> None:
    # The lease makes a concurrent removal wait: a row re-added here is then deleted by it (or recorded).
    if not await ctx.db(store.claim_active, ctx.engine, wanted.id, ctx.owner, ctx.settings.worker_lease_seconds):
        return
    try:
        row: PolicyRow | None
        if drift["kind"] == "missing":
            if not await ctx.db(store.mark_add_sent, ctx.engine, [wanted.id], ctx.owner, OverrideState.active):
                return  # ended meanwhile; its removal is due
            await client.add_policy(wanted.destination, wanted.policy, wanted.parameters)
            crash_point("after_reapply")
            row = await client.find_policy(wanted.destination)
        else:
            assert wanted.mailcow_id is not None
            attrs: dict[str, Any] = {"policy": wanted.policy, "parameters": wanted.parameters, "active": 1}
            if "dest" in drift["fields"]:
                attrs["dest"] = wanted.destination
            await client.edit_policy(wanted.mailcow_id, **attrs)
            crash_point("after_reapply")
            row = await client.get_policy(wanted.mailcow_id)
    except (MailcowError, ValueError) as exc:
        await ctx.db(store.release_active, ctx.engine, wanted.id, ctx.owner)
        await pause_if_refused(ctx, target, exc)
        log.warning("override %s: re-applying after drift failed: %s", wanted.id, describe(exc))
        WORKER_JOBS.labels("reapply", "retry").inc()
        return
    if row is None or not is_our_content(row, wanted.destination, wanted.policy, wanted.parameters) or row.active != 1:
        await ctx.db(store.release_active, ctx.engine, wanted.id, ctx.owner)
        log.warning("override %s: re-applied, but the row does not read back as ours: %s", wanted.id, row)
        return
    comment = f"re-applied after drift ({drift['kind']}) as row {row.id}"
    await ctx.db(_record, ctx.engine, wanted, "override.reapplied", comment, mailcow_id=row.id, owner=ctx.owner)
    WORKER_JOBS.labels("reapply", "done").inc()


def _record(
    engine: Engine,
    wanted: Wanted,
    action: str,
    comment: str,
    *,
    drift: dict[str, Any] | None = None,
    mailcow_id: int | None = None,
    audit: dict[str, Any] | None = None,
    owner: str | None = None,
) -> bool:
    """Record a drift finding, its repair or its end — if the override is still the one that was judged.

    `drift` becomes the override's drift field (None: no drift now); `mailcow_id` its row (None: keep);
    with `owner`, the caller holds the override's lease, which must still be its own and is released.
    """
    with transaction(engine) as session:
        override = session.get(Override, wanted.id, with_for_update=True)
        judged = (
            override is not None
            and override.state == OverrideState.active
            and override.mailcow_id == wanted.mailcow_id
            and (owner is None or override.lease_owner == owner)
        )
        if override is None or not judged:
            if owner is not None:
                store.drop_lease(session, wanted.id, owner)
            return False
        changes: dict[str, Any] = {"drift": drift}
        if mailcow_id is not None:
            changes["mailcow_id"] = mailcow_id
            changes["add_sent_at"] = None  # the re-apply's outcome is known now
        if owner is not None:
            changes.update(store.RELEASED)
        lifecycle.update_in_place(
            session,
            override,
            actor="system",
            action=action,
            comment=comment,
            changes=changes,
            audit_extra={"drift": audit} if audit else None,
        )
        return True
