"""What tlsoverride owns in each target's policy map, and the per-target bookkeeping.

Ownership is by mailcow row id (`override.mailcow_id`): a row is ours only if a live override recorded
its id. Every other row is inventory — listed, never touched. How a row of ours drifted is decided in
`app.mailcow.policy_map`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.core.errors import InvalidTransition, NotFound, ServiceUnavailable
from app.mailcow.client import PolicyRow
from app.mailcow.dest import dest_key
from app.mailcow.errors import MailcowAuthError, MailcowError
from app.mailcow.policy_map import PolicyMap, drift_of, row_dict
from app.mailcow.targets import Target, configured_targets
from app.overrides.models import ConflictStatus, Override, OverrideState, conflict_status_of
from app.overrides.permissions import ActionContext, refuse
from app.targets.models import MailcowTarget
from app.targets.schemas import MissingRowRead, PolicyRowRead, TargetPolicies, TargetRead

# States in which an override may own a mailcow row.
OWNING_STATES = (OverrideState.approved, OverrideState.active, OverrideState.removing)


@dataclass(frozen=True)
class Wanted:
    """What an override expects at its target (a plain copy: safe outside any session)."""

    id: int
    version: int
    state: OverrideState
    destination: str
    policy: str
    parameters: str
    mailcow_id: int | None
    drift: dict[str, Any] | None
    conflict: dict[str, Any] | None

    @classmethod
    def of(cls, override: Override) -> Wanted:
        return cls(
            id=override.id or 0,
            version=override.version,
            state=override.state,
            destination=override.destination,
            policy=override.policy,
            parameters=override.parameters,
            mailcow_id=override.mailcow_id,
            drift=override.drift,
            conflict=override.conflict,
        )


def owning_overrides(session: Session, target: str) -> list[Wanted]:
    rows = session.exec(
        select(Override).where(Override.target == target, col(Override.state).in_(list(OWNING_STATES)))
    ).all()
    return [Wanted.of(row) for row in rows]


@dataclass(frozen=True)
class RowView:
    row: PolicyRow
    owned_by: int | None
    override_state: OverrideState | None
    conflict_of: int | None
    drift: dict[str, Any] | None


@dataclass(frozen=True)
class MissingView:
    override: Wanted
    drift: dict[str, Any]


def describe_map(policy_map: PolicyMap, overrides: Sequence[Wanted]) -> tuple[list[RowView], list[MissingView]]:
    """Each row with its owner (or none) and drift; and the active overrides whose row is gone."""
    owner_of = {o.mailcow_id: o for o in overrides if o.mailcow_id is not None}
    conflict_of = {
        int(o.conflict["row"]["id"]): o.id
        for o in overrides
        if o.conflict
        and conflict_status_of(o.conflict) == ConflictStatus.open
        and isinstance(o.conflict.get("row"), dict)
    }
    views = []
    for row in sorted(policy_map.rows, key=lambda r: (dest_key(r.dest), r.id)):
        owner = owner_of.get(row.id)
        drift = drift_of(owner, policy_map) if owner is not None and owner.state == OverrideState.active else None
        views.append(
            RowView(
                row=row,
                owned_by=owner.id if owner else None,
                override_state=owner.state if owner else None,
                conflict_of=conflict_of.get(row.id),
                drift=drift,
            )
        )
    missing = []
    for wanted in overrides:
        if wanted.state == OverrideState.active and (
            wanted.mailcow_id is None or wanted.mailcow_id not in policy_map.by_id
        ):
            drift = drift_of(wanted, policy_map)
            if drift is not None:
                missing.append(MissingView(wanted, drift))
    return views, missing


# ---------------------------------------------------------------------------------------------------------------
# Per-target bookkeeping (table `mailcow_target`)


def ensure_targets(engine: Engine, names: Iterable[str]) -> None:
    """Create the bookkeeping row of each target (due for reconciliation now)."""
    with transaction(engine) as session:
        known = set(session.exec(select(MailcowTarget.name)).all())
        for name in names:
            if name not in known:
                session.add(MailcowTarget(name=name, reconcile_due_at=utcnow()))
    # Two workers starting together may both insert: the loser's commit fails; its next start finds the row.


# ---- pauses after an authentication failure ----------------------------------------------------------
#
# mailcow bans an IP after 10 failed logins in 10 minutes, so a refused key pauses the target for
# TLSO_MAILCOW_AUTH_BACKOFF_SECONDS. The pause names the key(s) refused (`refused_keys`, fingerprints):
# a process configured with another key — the key was corrected — is not held back by it, while one
# still running the refused key is (no retry loop into a ban during a rolling restart). Jobs that met
# the refusal stay due: the pause alone holds them back, so they run as soon as it ends (its timer, a
# corrected key, or an admin's resume), removals first as always.

MAX_REFUSED_KEYS = 4


@dataclass(frozen=True)
class Pause:
    target: str
    until: datetime
    reason: str | None
    applies: bool  # it is for the key configured here (False: the configured key is another one)


def is_paused(row: MailcowTarget | None, config: Target | None, now: datetime | None = None) -> bool:
    """Calls to this target with this key are paused: a pause is running and it is for this key."""
    now = now or utcnow()
    if row is None or config is None or row.paused_until is None or row.paused_until <= now:
        return False
    return any(config.holds_key(fingerprint) for fingerprint in (row.refused_keys or "").split())


def running_pauses(session: Session, configs: Mapping[str, Target]) -> list[Pause]:
    """Every running pause, and whether it holds back the keys configured here."""
    now = utcnow()
    rows = session.exec(select(MailcowTarget).where(col(MailcowTarget.paused_until) > now)).all()
    return [
        Pause(row.name, row.paused_until, row.pause_reason, is_paused(row, configs.get(row.name), now))
        for row in rows
        if row.paused_until is not None
    ]


def pause_target(engine: Engine, config: Target, seconds: float, reason: str) -> datetime:
    """Stop calling a target with this key for a while (mailcow refused it); returns the pause's end."""
    # Hashing is deliberately slow: done before the transaction (holds_key caches what it computes), so
    # that the row lock (on SQLite: the database) is held for milliseconds.
    mine = config.key_fingerprint()
    with Session(engine) as session:
        seen = session.get(MailcowTarget, config.name)
        for fingerprint in (seen.refused_keys or "").split() if seen else []:
            config.holds_key(fingerprint)
    with transaction(engine) as session:
        now = utcnow()
        row = session.get(MailcowTarget, config.name, with_for_update=True)
        if row is None:
            row = MailcowTarget(name=config.name, reconcile_due_at=now)
        running = row.paused_until is not None and row.paused_until > now
        keys = (row.refused_keys or "").split() if running else []
        known = any(config.holds_key(fingerprint) for fingerprint in keys)
        if not known:
            keys = [*keys[-(MAX_REFUSED_KEYS - 1) :], mine]
        until = now + timedelta(seconds=seconds)
        if running and row.paused_until is not None:
            until = max(until, row.paused_until)
        row.paused_until, row.pause_reason, row.refused_keys = until, reason[:500], " ".join(keys)
        session.add(row)
        if not known:  # once per pause and key, however many workers met the refusal
            record(
                session,
                actor="system",
                action="target.paused",
                after={"target": config.name, "paused_until": until, "keys_refused": len(keys)},
                comment=f"mailcow refused the API key: {reason[:300]}",
            )
    return until


def resume_target(session: Session, ctx: ActionContext, name: str, comment: str) -> TargetRead:
    """An admin ends a target's pause now; every job that waited for it is due at once."""
    if not ctx.principal.has("admin"):
        raise refuse(ctx, None, f"resume target {name}", ctx.principal.lacks("admin", to="resume a target"))
    if name not in ctx.settings.target_names():
        raise NotFound(f"There is no target {name!r}.")
    now = utcnow()
    row = session.get(MailcowTarget, name, with_for_update=True)
    if row is None or row.paused_until is None or row.paused_until <= now:
        raise InvalidTransition(f"Calls to {name} are not paused.")
    before = {"paused_until": row.paused_until, "pause_reason": row.pause_reason}
    row.paused_until = row.pause_reason = row.refused_keys = None
    session.add(row)
    due = _waiting_jobs_due(session, name, now)
    record(
        session,
        actor=ctx.principal.actor,
        via=ctx.principal.via,
        action="target.resumed",
        before=before,
        after={"target": name, "jobs_due_now": due},
        comment=comment,
    )
    session.flush()
    return _target_read(name, configured_targets(ctx.settings).get(name), row)


def _waiting_jobs_due(session: Session, name: str, now: datetime) -> int:
    """The target's applies and removals waiting for a retry are due now (none in flight is touched)."""
    result = session.execute(
        update(Override)
        .where(col(Override.target) == name, col(Override.state).in_([OverrideState.approved, OverrideState.removing]))
        .where(col(Override.next_attempt_at) > now)
        .where(or_(col(Override.lease_until).is_(None), col(Override.lease_until) < now))
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def claim_reconcile(engine: Engine, names: Sequence[str], owner: str, lease: timedelta) -> list[str]:
    """Lease the targets whose reconciliation is due and that nobody else is reconciling (the caller
    leaves out the targets paused for its key)."""
    claimed = []
    for name in names:
        with transaction(engine) as session:
            now = utcnow()
            result = session.execute(
                update(MailcowTarget)
                .where(col(MailcowTarget.name) == name)
                .where(col(MailcowTarget.reconcile_due_at) <= now)
                .where(or_(col(MailcowTarget.lease_until).is_(None), col(MailcowTarget.lease_until) < now))
                .values(lease_owner=owner, lease_until=now + lease)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(name)
    return claimed


def renew_reconcile(engine: Engine, names: Sequence[str], owner: str, lease: timedelta) -> None:
    """Extend this worker's reconcile leases while the pass is still running."""
    with transaction(engine) as session:
        session.execute(
            update(MailcowTarget)
            .where(col(MailcowTarget.name).in_(list(names)), col(MailcowTarget.lease_owner) == owner)
            .values(lease_until=utcnow() + lease)
            .execution_options(synchronize_session=False)
        )


def finish_reconcile(
    engine: Engine,
    name: str,
    owner: str,
    *,
    next_in: timedelta,
    error: str | None = None,
    owned: int | None = None,
    foreign: int | None = None,
) -> None:
    with transaction(engine) as session:
        values: dict[str, Any] = {
            "lease_owner": None,
            "lease_until": None,
            "reconcile_due_at": utcnow() + next_in,
            "last_reconcile_error": error[:1000] if error else None,
        }
        if error is None:
            values["last_reconcile_at"] = utcnow()
            values["rows_owned"] = owned or 0
            values["rows_foreign"] = foreign or 0
        session.execute(
            update(MailcowTarget)
            .where(col(MailcowTarget.name) == name, col(MailcowTarget.lease_owner) == owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )


# ---------------------------------------------------------------------------------------------------------------
# The API's view


def _target_read(name: str, config: Target | None, row: MailcowTarget | None) -> TargetRead:
    paused = is_paused(row, config)
    return TargetRead(
        name=name,
        configured=config is not None,
        url=_without_credentials(config.url) if config else None,
        last_reconcile_at=row.last_reconcile_at if row else None,
        last_reconcile_error=row.last_reconcile_error if row else None,
        paused_until=row.paused_until if row and paused else None,
        pause_reason=row.pause_reason if row and paused else None,
        rows_owned=row.rows_owned if row else 0,
        rows_foreign=row.rows_foreign if row else 0,
    )


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def list_targets(session: Session, settings: Settings) -> list[TargetRead]:
    configs = configured_targets(settings)  # reads the key files: once per request
    return [_target_read(name, configs.get(name), session.get(MailcowTarget, name)) for name in settings.target_names()]


def _snapshot(engine: Engine, name: str, config: Target) -> tuple[TargetRead, list[Wanted]]:
    with Session(engine) as session:
        return _target_read(name, config, session.get(MailcowTarget, name)), owning_overrides(session, name)


async def live_policies(engine: Engine, settings: Settings, name: str) -> TargetPolicies:
    """The target's map as mailcow has it now, each row with its owner and drift."""
    if name not in settings.target_names():
        raise NotFound(f"There is no target {name!r}.")
    config = configured_targets(settings).get(name)
    if config is None:
        raise ServiceUnavailable(f"Target {name!r} has no mailcow URL or API key configured.")
    # Overrides first, then the map (an override applied in between must not look like drift).
    status, overrides = await asyncio.to_thread(_snapshot, engine, name, config)
    if status.paused_until is not None:
        raise ServiceUnavailable(
            f"Calls to {name} are paused until {status.paused_until.isoformat()} after an authentication failure.",
            headers={"Retry-After": str(max(1, int((status.paused_until - utcnow()).total_seconds())))},
        )
    async with config.client(settings, attempts=1) as client:
        try:
            rows = await client.list_policies()
        except MailcowAuthError as exc:
            await asyncio.to_thread(pause_target, engine, config, settings.mailcow_auth_backoff_seconds, exc.message)
            raise ServiceUnavailable(f"mailcow {name} rejected our API key; calls are paused.") from exc
        except MailcowError as exc:
            raise ServiceUnavailable(f"mailcow {name} did not answer usefully ({exc.kind}).") from exc
    views, missing = describe_map(PolicyMap(rows), overrides)
    return TargetPolicies(
        target=status,
        fetched_at=utcnow(),
        rows=[
            PolicyRowRead(
                **row_dict(view.row),
                owned_by=view.owned_by,
                override_state=view.override_state,
                conflict_of=view.conflict_of,
                drift=view.drift,
            )
            for view in views
        ],
        missing=[
            MissingRowRead(
                override_id=item.override.id,
                destination=item.override.destination,
                policy=item.override.policy,
                parameters=item.override.parameters,
                mailcow_id=item.override.mailcow_id,
                drift=item.drift,
            )
            for item in missing
        ],
    )
