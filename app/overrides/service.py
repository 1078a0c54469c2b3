"""The override state machine: every decision about an override is made here.

One transitions table, one `transition()` that checks it, compare-and-sets the row in SQL and queues
the audit entry in the same transaction. Services never commit: the caller's unit of work does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.refusals import record_refusal
from app.audit.service import record
from app.core.auth import Principal
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import (
    Conflict,
    FieldError,
    Forbidden,
    InvalidInput,
    InvalidTransition,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
)
from app.core.person import person_key
from app.core.text import decode_cursor, encode_cursor, visible_length
from app.overrides.models import TERMINAL_STATES, Override, OverrideState, Vote
from app.overrides.postfix import (
    POLICY_STRENGTH,
    PolicyInputError,
    normalise_destination,
    normalise_parameters,
)
from app.overrides.schemas import OverrideCreate

S = OverrideState

TRANSITIONS: dict[OverrideState, frozenset[OverrideState]] = {
    S.pending: frozenset({S.approved, S.rejected, S.cancelled, S.lapsed}),
    S.approved: frozenset({S.active, S.failed, S.cancelled, S.revoked, S.removing}),
    S.active: frozenset({S.removing}),
    # `failed` from `removing`: an apply that failed for good after an admin let it replace a foreign
    # row; the removal puts that row back first.
    S.removing: frozenset({S.expired, S.revoked, S.remediated, S.cancelled, S.failed}),
    **{state: frozenset() for state in TERMINAL_STATES},
}

# Why an override is being removed → the terminal state once mailcow is clean.
END_STATE = {
    "expired": S.expired,
    "revoked": S.revoked,
    "remediated": S.remediated,
    "cancelled": S.cancelled,
    "apply_failed": S.failed,
}


def snapshot(override: Override) -> dict[str, Any]:
    """The fields an audit entry shows before/after a change."""
    return {
        "state": override.state.value,
        "version": override.version,
        "target": override.target,
        "destination": override.destination,
        "policy": override.policy,
        "parameters": override.parameters,
        "expires_at": override.expires_at,
        "mailcow_id": override.mailcow_id,
    }


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
    """Change an override without changing its state (an extension, a conflict note), same guarantees."""
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
    values: dict[str, Any] = {
        "state": to,
        "live": to not in TERMINAL_STATES,
        "version": override.version + 1,
        "updated_at": now,
        **(changes or {}),
    }
    if to in TERMINAL_STATES and override.ended_at is None:
        values.setdefault("ended_at", now)
    result = session.execute(
        update(Override)
        .where(col(Override.id) == override.id)
        .where(col(Override.state) == override.state)
        .where(col(Override.version) == override.version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict("The override was changed concurrently; reload it and try again.")
    session.expire(override)
    session.refresh(override)
    after = snapshot(override)
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


# ---------------------------------------------------------------------------------------------------------------
# Loading and authorising


def load(session: Session, override_id: int, *, for_update: bool = False) -> Override:
    query = select(Override).where(Override.id == override_id)
    if for_update:
        query = query.with_for_update()
    override = session.exec(query).first()
    if override is None:
        raise NotFound(f"Override {override_id} does not exist.")
    return override


def can_see(principal: Principal, override: Override) -> bool:
    return principal.has("approver", "admin", "auditor") or override.requested_by_key == principal.key


@dataclass(frozen=True)
class ActionContext:
    """What every action needs: who, with what version precondition, and where to log refusals."""

    principal: Principal
    settings: Settings
    engine: Engine
    if_match: str | None = None
    session: Session | None = None  # the request's own, ended before a refusal is recorded


def refuse(ctx: ActionContext, override_id: int | None, action: str, reason: str) -> Forbidden:
    """Record a refused authorisation (in its own transaction: the request's own is rolled back)."""
    if ctx.session is not None:
        # It would be rolled back anyway; end it first, because on SQLite it holds the only write lock
        # and the refusal's transaction would wait for it until the busy timeout (then fail: a 500).
        ctx.session.rollback()
    record_refusal(
        ctx.engine,
        ctx.settings,
        actor=ctx.principal.actor,
        via=ctx.principal.via,
        override_id=override_id,
        after={"attempted": action, "roles": sorted(ctx.principal.roles)},
        comment=reason,
    )
    return Forbidden(reason)


def _check_version(ctx: ActionContext, override: Override) -> None:
    if ctx.if_match is None:
        if ctx.settings.require_if_match:
            raise PreconditionRequired("Send If-Match with the override's ETag.")
        return
    # The tag names a version, not a byte representation, so `W/"2"` counts as `"2"`: reverse proxies
    # that compress answers (nginx gzip) weaken ETags on the way out, and clients send them back so.
    wanted = {tag.strip().removeprefix("W/").strip('"') for tag in ctx.if_match.split(",")}
    if "*" not in wanted and str(override.version) not in wanted:
        raise PreconditionFailed(
            f"The override is at version {override.version}; reload it and decide again.",
        )


Permission = Callable[[Principal, Override], bool]


def reviewer(principal: Principal, override: Override) -> bool:
    return principal.has("approver", "admin")


def owner_or_admin(principal: Principal, override: Override) -> bool:
    return override.requested_by_key == principal.key or principal.has("admin")


def admin(principal: Principal, override: Override) -> bool:
    return principal.has("admin")


def _load_for_action(
    session: Session, ctx: ActionContext, override_id: int, action: str, allowed: Permission, reason: str
) -> Override:
    """The override, locked, once the caller may see it, may do `action` on it, and decided on its
    current version — in that order, so a refused caller learns nothing more and is always on record."""
    override = load(session, override_id, for_update=True)
    if not can_see(ctx.principal, override):
        refuse(ctx, override.id, action, f"{action} on an override the caller may not see")
        raise NotFound(f"Override {override_id} does not exist.")
    if not allowed(ctx.principal, override):
        raise refuse(ctx, override.id, action, reason)
    _check_version(ctx, override)
    return override


# ---------------------------------------------------------------------------------------------------------------
# Create and query


def _bounded_duration(requested: timedelta | None, settings: Settings) -> timedelta:
    # `is None`, not `or`: a zero duration is an error, not a request for the default.
    duration = settings.default_duration if requested is None else requested
    _require_whole_seconds(duration)
    if duration > settings.max_duration:
        raise InvalidInput.on("body.duration", f"must not exceed the maximum of {settings.max_duration}")
    return duration


def _require_whole_seconds(duration: timedelta) -> None:
    # Stored in seconds: `PT0.5S` would become 0 (no override, or a phantom extension).
    if duration < timedelta(seconds=1) or duration.microseconds:
        raise InvalidInput.on("body.duration", "must be a positive whole number of seconds (e.g. PT12H, P3D)")


def _require_comment_length(value: str, field: str, minimum: int) -> str:
    text = value.strip()
    if visible_length(text) < minimum:
        raise InvalidInput.on(field, f"must be at least {minimum} visible characters: say why mail needs this")
    return text


def validate_request(body: OverrideCreate, settings: Settings) -> tuple[str, str, str, timedelta]:
    """Target, destination, parameters and duration as they will be stored; or a field-level error."""
    target = body.target or settings.default_target
    if target not in target_names(settings):
        raise InvalidInput.on("body.target", f"unknown target {target!r}; known: {', '.join(target_names(settings))}")
    try:
        destination = normalise_destination(
            body.destination,
            allow_subdomains=settings.mailcow_supports_subdomain_dest,
            field="body.destination",
        )
        parameters = normalise_parameters(body.parameters, body.policy, field="body.parameters")
    except PolicyInputError as exc:
        raise InvalidInput.on(exc.field, f"{exc.field.removeprefix('body.')} {exc.message}") from exc
    _require_comment_length(body.justification, "body.justification", settings.justification_min_length)
    return target, destination, parameters, _bounded_duration(body.duration, settings)


def target_names(settings: Settings) -> list[str]:
    return [
        settings.default_target,
        *[name for name in settings.mailcow_targets if name != settings.default_target],
    ]


def create_override(
    session: Session,
    ctx: ActionContext,
    body: OverrideCreate,
    *,
    diagnosis: dict[str, Any] | None = None,
    findings: list[dict[str, Any]] | None = None,
) -> Override:
    """Record a new request (pending, or approved at once for auto-approved policies)."""
    principal, settings = ctx.principal, ctx.settings
    if not principal.has("requester", "admin"):
        raise refuse(ctx, None, "create", "Creating overrides needs the requester role.")
    target, destination, parameters, duration = validate_request(body, settings)
    existing = find_live(session, target, destination)
    if existing is not None:
        raise Conflict(
            f"Override {existing.id} for {destination} on {target} is still {existing.state}.",
            existing=f"/v1/overrides/{existing.id}",
        )
    refused = [f for f in findings or [] if f.get("refused")]
    if refused:
        raise InvalidInput(
            "; ".join(str(f["message"]) for f in refused),
            errors=[FieldError(field="body.policy", message=str(f["message"])) for f in refused],
        )
    now = utcnow()
    auto = body.policy in settings.auto_approve_policies and POLICY_STRENGTH[body.policy] > POLICY_STRENGTH["dane"]
    override = Override(
        target=target,
        destination=destination,
        policy=body.policy,
        parameters=parameters,
        justification=body.justification.strip(),
        ticket=body.ticket,
        ticket_url=body.ticket_url,
        duration_seconds=int(duration.total_seconds()),
        state=S.approved if auto else S.pending,
        requested_by=principal.actor,
        requested_by_key=principal.key,
        requested_by_name=principal.name,
        requested_via=principal.via,
        approvals_required=0 if auto else settings.approvals_for(body.policy),
        created_at=now,
        updated_at=now,
        review_deadline=None if auto else now + settings.review_window,
        next_attempt_at=now if auto else None,
        diagnosis=diagnosis,
        findings=findings or [],
    )
    session.add(override)
    try:
        session.flush()
    except IntegrityError as exc:
        # Another request for the same destination won the race; the partial unique index said no.
        session.rollback()
        existing = find_live(session, target, destination)
        raise Conflict(
            f"A live override for {destination} on {target} already exists.",
            existing=f"/v1/overrides/{existing.id}" if existing else None,
        ) from exc
    record(
        session,
        actor=principal.actor,
        via=principal.via,
        action="override.created",
        override_id=override.id,
        after=snapshot(override)
        | {
            "duration": body.duration or duration,
            "justification": override.justification,
            "ticket": override.ticket,
        },
        comment=override.justification,
    )
    if auto:
        record(
            session,
            actor="system",
            action="override.auto_approved",
            override_id=override.id,
            after=snapshot(override),
            comment=f"policy {body.policy} is stronger than the default",
        )
    return override


def find_live(session: Session, target: str, destination: str) -> Override | None:
    return session.exec(
        select(Override).where(
            Override.target == target, Override.destination == destination, col(Override.live).is_(True)
        )
    ).first()


@dataclass(frozen=True)
class OverrideFilter:
    state: Sequence[OverrideState] | None = None
    destination: str | None = None
    requester: str | None = None
    ticket: str | None = None
    target: str | None = None
    overdue: bool | None = None


def _normalised_or_raw(destination: str) -> str:
    # Filter by the stored form (`Bücher.Example` → `xn--bcher-kva.example`); a value that is not a valid
    # destination simply matches nothing.
    try:
        return normalise_destination(destination, allow_subdomains=True)
    except PolicyInputError:
        return destination.strip().lower()


def list_overrides(
    session: Session, principal: Principal, filters: OverrideFilter, cursor: str | None, limit: int
) -> tuple[list[Override], str | None]:
    """Newest first, stable under inserts: keyset pagination on the id."""
    query = select(Override)
    if not principal.has("approver", "admin", "auditor"):
        query = query.where(Override.requested_by_key == principal.key)
    if filters.state:
        query = query.where(col(Override.state).in_(list(filters.state)))
    if filters.destination:
        query = query.where(Override.destination == _normalised_or_raw(filters.destination))
    if filters.requester:
        query = query.where(Override.requested_by_key == person_key(filters.requester))
    if filters.ticket:
        query = query.where(Override.ticket == filters.ticket)
    if filters.target:
        query = query.where(Override.target == filters.target)
    if filters.overdue is not None:
        overdue = (col(Override.state) == S.removing) & (col(Override.removal_deadline) < utcnow())
        query = query.where(overdue if filters.overdue else ~overdue)
    after = decode_cursor("o", cursor)
    if after is not None:
        query = query.where(col(Override.id) < after)
    rows = list(session.exec(query.order_by(col(Override.id).desc()).limit(limit + 1)).all())
    next_cursor = encode_cursor("o", rows[limit - 1].id or 0) if len(rows) > limit else None
    return rows[:limit], next_cursor


def votes_of(session: Session, override_id: int) -> list[Vote]:
    return list(session.exec(select(Vote).where(Vote.override_id == override_id).order_by(col(Vote.id))).all())


def is_overdue(override: Override, now: datetime | None = None) -> bool:
    return (
        override.state == S.removing
        and override.removal_deadline is not None
        and override.removal_deadline < (now or utcnow())
    )


# ---------------------------------------------------------------------------------------------------------------
# Decisions


REVIEWERS_ONLY = "Deciding on requests needs the approver role."


def asked_for_it(principal: Principal, override: Override) -> bool:
    """Whether the caller is the person who asked for the override or for its pending extension."""
    askers = {override.requested_by_key, override.extension_requested_by_key if override.extension_round else None}
    return principal.key in askers


def _vote(session: Session, ctx: ActionContext, override: Override, decision: str, comment: str) -> Vote:
    principal = ctx.principal
    round_ = override.extension_round
    if asked_for_it(principal, override):
        raise refuse(ctx, override.id, decision, "Nobody may decide on their own request.")
    votes = session.exec(select(Vote).where(Vote.override_id == override.id, Vote.round == round_)).all()
    already = next((v for v in votes if v.reviewer_key == principal.key), None)
    if already is not None:
        raise Conflict(f"{principal.actor} already voted '{already.decision}' on this request.")
    limit = ctx.settings.integration_approvals_per_round
    if decision == "approve" and principal.via is not None:
        through_it = sum(1 for v in votes if v.decision == "approve" and v.via == principal.via)
        if through_it >= limit:
            # An integration can name any user: its word alone must not make up a multi-approval quorum.
            raise refuse(
                ctx,
                override.id,
                decision,
                f"{principal.via} already carried {through_it} approval(s) of this request; "
                "the next one must come from another reviewer directly (or through another integration).",
            )
    vote = Vote(
        override_id=override.id or 0,
        round=round_,
        reviewer=principal.actor,
        reviewer_key=principal.key,
        reviewer_name=principal.name,
        via=principal.via,
        decision=decision,
        comment=comment,
        created_at=utcnow(),
    )
    session.add(vote)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"{principal.actor} already voted on this request.") from exc
    record(
        session,
        actor=principal.actor,
        via=principal.via,
        action=f"vote.{decision}",
        override_id=override.id,
        after={"round": round_, "decision": decision},
        comment=comment,
    )
    return vote


def _refuse_if_lapsed(override: Override) -> None:
    # The worker records the lapse; a late decision must not revive the request meanwhile.
    if override.state == S.pending and override.review_deadline and override.review_deadline <= utcnow():
        raise InvalidTransition("The review window has passed; the request lapses and needs to be asked again.")


def lapse(session: Session, override: Override) -> Override:
    """Nobody decided within the review window (called by the worker)."""
    return transition(
        session,
        override,
        S.lapsed,
        actor="system",
        action="override.lapsed",
        comment="nobody decided within the review window",
        changes={"end_reason": "lapsed"},
    )


def approve(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """One reviewer approves the request (or its pending extension); enough approvals move it on."""
    override = _load_for_action(session, ctx, override_id, "approve", reviewer, REVIEWERS_ONLY)
    if override.state == S.pending:
        _refuse_if_lapsed(override)
    elif not (override.state in {S.active, S.approved} and override.extension_seconds):
        raise InvalidTransition(f"There is nothing to approve on an override in state '{override.state}'.")
    _vote(session, ctx, override, "approve", comment)
    approvals = session.exec(
        select(func.count())
        .select_from(Vote)
        .where(
            Vote.override_id == override.id,
            Vote.round == override.extension_round,
            Vote.decision == "approve",
        )
    ).one()
    actor, via = ctx.principal.actor, ctx.principal.via
    if approvals < override.approvals_required:
        return update_in_place(
            session,
            override,
            actor=actor,
            via=via,
            action="override.approval_recorded",
            comment=comment,
            audit_extra={"approvals": approvals},
        )
    if override.state == S.pending:
        return transition(
            session,
            override,
            S.approved,
            actor=actor,
            via=via,
            action="override.approved",
            comment=comment,
            changes={"next_attempt_at": utcnow()},
            audit_extra={"approvals": approvals},
        )
    extension = timedelta(seconds=override.extension_seconds or 0)
    changes: dict[str, Any] = {
        "extension_seconds": None,
        "extension_requested_by": None,
        "extension_requested_by_key": None,
        "duration_seconds": override.duration_seconds + int(extension.total_seconds()),
    }
    if override.expires_at is not None:
        changes["expires_at"] = override.expires_at + extension
    return update_in_place(
        session,
        override,
        actor=actor,
        via=via,
        action="override.extended",
        comment=comment,
        changes=changes,
        audit_extra={"extended_by": extension},
    )


def reject(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """A reviewer rejects the request (or only its pending extension)."""
    override = _load_for_action(session, ctx, override_id, "reject", reviewer, REVIEWERS_ONLY)
    if override.state == S.pending:
        _refuse_if_lapsed(override)
        _vote(session, ctx, override, "reject", comment)
        return transition(
            session,
            override,
            S.rejected,
            actor=ctx.principal.actor,
            via=ctx.principal.via,
            action="override.rejected",
            comment=comment,
        )
    if override.state in {S.active, S.approved} and override.extension_seconds:
        _vote(session, ctx, override, "reject", comment)
        return update_in_place(
            session,
            override,
            actor=ctx.principal.actor,
            via=ctx.principal.via,
            action="override.extension_rejected",
            comment=comment,
            changes={"extension_seconds": None, "extension_requested_by": None, "extension_requested_by_key": None},
        )
    raise InvalidTransition(f"There is nothing to reject on an override in state '{override.state}'.")


def begin_removal(
    session: Session,
    override: Override,
    reason: str,
    *,
    actor: str,
    via: str | None,
    comment: str | None,
    settings: Settings,
) -> Override:
    """Hand an applied (or possibly applied) override to the worker for removal from mailcow."""
    now = utcnow()
    return transition(
        session,
        override,
        S.removing,
        actor=actor,
        via=via,
        action=f"override.{reason}",
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


def cancel(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """The requester (or an admin) withdraws a request, or ends their own override early."""
    reason = "Only the requester or an admin may cancel an override."
    override = _load_for_action(session, ctx, override_id, "cancel", owner_or_admin, reason)
    principal = ctx.principal
    if override.state == S.pending or (override.state == S.approved and override.add_sent_at is None):
        return transition(
            session,
            override,
            S.cancelled,
            actor=principal.actor,
            via=principal.via,
            action="override.cancelled",
            comment=comment,
            changes={"end_reason": "cancelled"},
        )
    if override.state in {S.approved, S.active}:
        # The worker may have added the mailcow row already: it must be removed before this ends.
        return begin_removal(
            session,
            override,
            "cancelled",
            actor=principal.actor,
            via=principal.via,
            comment=comment,
            settings=ctx.settings,
        )
    raise InvalidTransition(f"An override in state '{override.state}' cannot be cancelled.")


def revoke(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """An admin ends an approved or active override now."""
    override = _load_for_action(session, ctx, override_id, "revoke", admin, "Revoking needs the admin role.")
    if override.state == S.approved and override.add_sent_at is None:
        return transition(
            session,
            override,
            S.revoked,
            actor=ctx.principal.actor,
            via=ctx.principal.via,
            action="override.revoked",
            comment=comment,
            changes={"end_reason": "revoked"},
        )
    if override.state in {S.approved, S.active}:
        return begin_removal(
            session,
            override,
            "revoked",
            actor=ctx.principal.actor,
            via=ctx.principal.via,
            comment=comment,
            settings=ctx.settings,
        )
    raise InvalidTransition(f"An override in state '{override.state}' cannot be revoked.")


def extend(session: Session, ctx: ActionContext, override_id: int, duration: timedelta, comment: str) -> Override:
    """Ask for more time on an approved or active override; it needs approval like the request did."""
    reason = "Only the requester or an admin may ask to extend an override."
    override = _load_for_action(session, ctx, override_id, "extend", owner_or_admin, reason)
    principal = ctx.principal
    if override.state not in {S.approved, S.active}:
        raise InvalidTransition(f"An override in state '{override.state}' cannot be extended.")
    if override.extension_seconds:
        raise Conflict("An extension is already waiting for approval.")
    _require_whole_seconds(duration)
    total = timedelta(seconds=override.duration_seconds) + duration
    if total > ctx.settings.max_duration:
        room = ctx.settings.max_duration - timedelta(seconds=override.duration_seconds)
        raise InvalidInput.on(
            "body.duration",
            f"would exceed the maximum total of {ctx.settings.max_duration}; at most {max(room, timedelta(0))} is left",
        )
    return update_in_place(
        session,
        override,
        actor=principal.actor,
        via=principal.via,
        action="override.extension_requested",
        comment=comment,
        changes={
            "extension_round": override.extension_round + 1,
            "extension_seconds": int(duration.total_seconds()),
            "extension_requested_by": principal.actor,
            "extension_requested_by_key": principal.key,
        },
        audit_extra={"requested_extension": duration},
    )


def resolve_conflict(session: Session, ctx: ActionContext, override_id: int, action: str, comment: str) -> Override:
    """An admin decides about a foreign mailcow row that blocks an approved override: replace or abandon."""
    reason = "Resolving conflicts needs the admin role."
    override = _load_for_action(session, ctx, override_id, "resolve-conflict", admin, reason)
    principal = ctx.principal
    if action not in ("replace", "abandon"):
        raise InvalidInput.on("body.action", "must be 'replace' or 'abandon'")
    conflict = override.conflict or {}
    if override.state != S.approved or conflict.get("status") != "open":
        raise InvalidTransition("This override has no open conflict to resolve.")
    decided = {"resolution": action, "resolved_by": principal.actor, "resolved_at": utcnow().isoformat()}
    if action == "abandon":
        return transition(
            session,
            override,
            S.failed,
            actor=principal.actor,
            via=principal.via,
            action="override.conflict_abandoned",
            comment=comment,
            changes={
                "conflict": {**conflict, **decided, "status": "abandoned"},
                "end_reason": "conflict",
                "next_attempt_at": None,
            },
        )
    # The worker deletes the foreign row (the snapshot is kept), applies ours, and restores it at the end.
    return update_in_place(
        session,
        override,
        actor=principal.actor,
        via=principal.via,
        action="override.conflict_resolved",
        comment=comment,
        changes={
            "conflict": {**conflict, **decided, "status": "replace"},
            "next_attempt_at": utcnow(),
            "attempts": 0,
            "last_error": None,
        },
        audit_extra={"resolution": action, "foreign_row": conflict.get("row")},
    )
