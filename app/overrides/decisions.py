"""The decisions people make about an override: approve and reject (one vote each, never on their own
request, enough approvals move it on), cancel, revoke, extend, and resolving a conflict. Where an
approval is decided: here."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict, InvalidInput, InvalidTransition
from app.mailcow.policies import TlsPolicy
from app.overrides.lifecycle import END_STATE, begin_removal, transition, update_in_place
from app.overrides.models import ConflictStatus, EndReason, Override, OverrideState, Vote
from app.overrides.permissions import (
    CANCEL,
    EXTEND,
    RESOLVE_CONFLICT,
    REVIEW,
    REVOKE,
    ActionContext,
    asked_for_it,
    load_for_action,
    refuse,
)
from app.overrides.postfix import POLICY_STRENGTH
from app.overrides.validation import require_whole_seconds


def approvals_needed(policy: TlsPolicy, settings: Settings) -> int:
    """How many reviewers must approve a request for `policy` (TLSO_APPROVALS_REQUIRED); 0: none, it is
    approved at once (listed in TLSO_AUTO_APPROVE_POLICIES, and stronger than mailcow's default `dane`)."""
    if policy in settings.auto_approve_policies and POLICY_STRENGTH[policy] > POLICY_STRENGTH["dane"]:
        return 0
    return settings.approvals_for(policy)


def approve(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """One reviewer approves the request (or its pending extension); enough approvals move it on."""
    override = load_for_action(session, ctx, override_id, "approve", REVIEW)
    if override.state == OverrideState.pending:
        _refuse_if_lapsed(override)
    elif not (override.state in {OverrideState.active, OverrideState.approved} and override.extension_seconds):
        raise InvalidTransition(f"There is nothing to approve on an override in state '{override.state}'.")
    _vote(session, ctx, override, "approve", comment)
    # Counted from the votes read under the override's lock, this one included: no vote can come between.
    approvals = sum(
        1 for v in ctx.votes[override.id or 0] if v.round == override.extension_round and v.decision == "approve"
    )
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
    if override.state == OverrideState.pending:
        return transition(
            session,
            override,
            OverrideState.approved,
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
    override = load_for_action(session, ctx, override_id, "reject", REVIEW)
    if override.state == OverrideState.pending:
        _refuse_if_lapsed(override)
        _vote(session, ctx, override, "reject", comment)
        return transition(
            session,
            override,
            OverrideState.rejected,
            actor=ctx.principal.actor,
            via=ctx.principal.via,
            action="override.rejected",
            comment=comment,
        )
    if override.state in {OverrideState.active, OverrideState.approved} and override.extension_seconds:
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


def _vote(session: Session, ctx: ActionContext, override: Override, decision: str, comment: str) -> Vote:
    principal = ctx.principal
    round_ = override.extension_round
    if asked_for_it(principal, override):
        raise refuse(ctx, override.id, decision, "Nobody may decide on their own request.")
    # Every round's votes (the answer shows them all); this round's decide. The override is locked
    # (`load_for_action`), so they stay as read until this transaction ends.
    every_vote = list(session.exec(select(Vote).where(Vote.override_id == override.id).order_by(col(Vote.id))).all())
    votes = [v for v in every_vote if v.round == round_]
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
    ctx.votes[override.id or 0] = [*every_vote, vote]
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
    if override.state == OverrideState.pending and override.review_deadline and override.review_deadline <= utcnow():
        raise InvalidTransition("The review window has passed; the request lapses and needs to be asked again.")


def cancel(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """The requester (or an admin) withdraws a request, or ends their own override early."""
    override = load_for_action(session, ctx, override_id, "cancel", CANCEL)
    if override.state not in {OverrideState.pending, OverrideState.approved, OverrideState.active}:
        raise InvalidTransition(f"An override in state '{override.state}' cannot be cancelled.")
    return _end_early(session, ctx, override, EndReason.cancelled, comment)


def revoke(session: Session, ctx: ActionContext, override_id: int, comment: str) -> Override:
    """An admin ends an approved or active override now."""
    override = load_for_action(session, ctx, override_id, "revoke", REVOKE)
    if override.state not in {OverrideState.approved, OverrideState.active}:
        raise InvalidTransition(f"An override in state '{override.state}' cannot be revoked.")
    return _end_early(session, ctx, override, EndReason.revoked, comment)


def _end_early(session: Session, ctx: ActionContext, override: Override, reason: EndReason, comment: str) -> Override:
    """End an override before its time: at once while no add of it can have reached mailcow, else through
    the worker's removal (the row must be gone before it ends)."""
    principal = ctx.principal
    if override.state == OverrideState.pending or (
        override.state == OverrideState.approved and override.add_sent_at is None
    ):
        return transition(
            session,
            override,
            END_STATE[reason],
            actor=principal.actor,
            via=principal.via,
            action=f"override.{reason.value}",
            comment=comment,
            changes={"end_reason": reason},
        )
    return begin_removal(
        session, override, reason, actor=principal.actor, via=principal.via, comment=comment, settings=ctx.settings
    )


def extend(session: Session, ctx: ActionContext, override_id: int, duration: timedelta, comment: str) -> Override:
    """Ask for more time on an approved or active override; it needs approval like the request did."""
    override = load_for_action(session, ctx, override_id, "extend", EXTEND)
    principal = ctx.principal
    if override.state not in {OverrideState.approved, OverrideState.active}:
        raise InvalidTransition(f"An override in state '{override.state}' cannot be extended.")
    if override.extension_seconds:
        raise Conflict("An extension is already waiting for approval.")
    require_whole_seconds(duration)
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
    override = load_for_action(session, ctx, override_id, "resolve-conflict", RESOLVE_CONFLICT)
    principal = ctx.principal
    if action not in ("replace", "abandon"):
        raise InvalidInput.on("body.action", "must be 'replace' or 'abandon'")
    conflict = override.conflict or {}
    if override.state != OverrideState.approved or override.conflict_status != ConflictStatus.open:
        raise InvalidTransition("This override has no open conflict to resolve.")
    decided = {"resolution": action, "resolved_by": principal.actor, "resolved_at": utcnow().isoformat()}
    if action == "abandon":
        return transition(
            session,
            override,
            OverrideState.failed,
            actor=principal.actor,
            via=principal.via,
            action="override.conflict_abandoned",
            comment=comment,
            changes={
                "conflict": {**conflict, **decided, "status": ConflictStatus.abandoned.value},
                "end_reason": EndReason.conflict,
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
            "conflict": {**conflict, **decided, "status": ConflictStatus.replace.value},
            "next_attempt_at": utcnow(),
            "attempts": 0,
            "last_error": None,
        },
        audit_extra={"resolution": action, "foreign_row": conflict.get("row")},
    )
