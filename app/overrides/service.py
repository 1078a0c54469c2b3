"""Taking requests and finding overrides: a new request is authorised, validated, given its evidence and
inserted (`create_override`); the API's lists and filters. Decisions about an existing override are in
`decisions.py`, its states and transitions in `lifecycle.py`, who may do what in `permissions.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.auth import Principal
from app.core.db import utcnow
from app.core.errors import Conflict, FieldError, InvalidInput
from app.core.person import person_key
from app.core.text import decode_cursor, encode_cursor
from app.overrides.decisions import approvals_needed
from app.overrides.evidence import Evidence
from app.overrides.lifecycle import find_live, snapshot
from app.overrides.models import Override, OverrideState, Vote
from app.overrides.permissions import ActionContext, refuse, visible_to
from app.overrides.postfix import PolicyInputError, normalise_destination
from app.overrides.schemas import OverrideCreate
from app.overrides.validation import validate_request


def create_override(session: Session, ctx: ActionContext, body: OverrideCreate, evidence: Evidence) -> Override:
    """Take a new request: authorise, validate, gather its evidence, insert it (pending, or approved at once
    for auto-approved policies)."""
    principal, settings = ctx.principal, ctx.settings
    if not principal.has("requester", "admin"):
        raise refuse(ctx, None, "create", principal.lacks("requester", "admin", to="request overrides"))
    target, destination, parameters, duration = validate_request(body, settings)
    # The probes run before `session` is first used: on SQLite its transaction holds the only write lock.
    diagnosis, findings = evidence.gather(ctx, target, destination, body.policy, parameters)
    queue = evidence.queue(ctx, target, destination)
    ctx.claim(session)
    refused = [f for f in findings or [] if f.get("refused")]
    if refused:
        _refuse_if_live(session, target, destination)  # a 409 comes before the 400
        raise InvalidInput(
            "; ".join(str(f["message"]) for f in refused),
            errors=[FieldError(field="body.policy", message=str(f["message"])) for f in refused],
        )
    now = utcnow()
    required = approvals_needed(body.policy, settings)
    auto = required == 0
    override = Override(
        target=target,
        destination=destination,
        policy=body.policy,
        parameters=parameters,
        justification=body.justification.strip(),
        ticket=body.ticket,
        ticket_url=body.ticket_url,
        duration_seconds=int(duration.total_seconds()),
        state=OverrideState.approved if auto else OverrideState.pending,
        requested_by=principal.actor,
        requested_by_key=principal.key,
        requested_by_name=principal.name,
        requested_via=principal.via,
        approvals_required=required,
        created_at=now,
        updated_at=now,
        review_deadline=None if auto else now + settings.review_window,
        next_attempt_at=now if auto else None,
        diagnosis=diagnosis,
        findings=findings or [],
        queue=queue,
    )
    session.add(override)
    try:
        session.flush()
    except IntegrityError as exc:
        # The destination has a live override: the partial unique index is the check (no look before the
        # INSERT, one round trip less), also against a request that raced this one. Name the override.
        session.rollback()
        _refuse_if_live(session, target, destination)
        raise Conflict(f"A live override for {destination} on {target} already exists.") from exc
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


def _refuse_if_live(session: Session, target: str, destination: str) -> None:
    existing = find_live(session, target, destination)
    if existing is not None:
        existing_id, state = existing
        raise Conflict(
            f"Override {existing_id} for {destination} on {target} is still {state}.",
            existing=f"/v1/overrides/{existing_id}",
        )


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
    visible = visible_to(principal)
    if visible is not None:
        query = query.where(visible)
    if filters.state:
        query = query.where(col(Override.state).in_(list(filters.state)))
    if filters.destination:
        query = query.where(Override.destination == _normalised_or_raw(filters.destination))
    if filters.requester:
        query = query.where(Override.requested_by_key == person_key(filters.requester))
    if filters.ticket:
        # Case-insensitive (an integration's `mail-4711` finds `MAIL-4711`), served by the index on lower(ticket).
        query = query.where(func.lower(Override.ticket) == filters.ticket.lower())
    if filters.target:
        query = query.where(Override.target == filters.target)
    if filters.overdue is not None:
        overdue = (col(Override.state) == OverrideState.removing) & (col(Override.removal_deadline) < utcnow())
        query = query.where(overdue if filters.overdue else ~overdue)
    after = decode_cursor("o", cursor)
    if after is not None:
        query = query.where(col(Override.id) < after)
    rows = list(session.exec(query.order_by(col(Override.id).desc()).limit(limit + 1)).all())
    next_cursor = encode_cursor("o", rows[limit - 1].id or 0) if len(rows) > limit else None
    return rows[:limit], next_cursor


def votes_of(session: Session, override_id: int) -> list[Vote]:
    return list(session.exec(select(Vote).where(Vote.override_id == override_id).order_by(col(Vote.id))).all())


def votes_by_override(session: Session, override_ids: Sequence[int]) -> dict[int, list[Vote]]:
    """The votes of several overrides in one query (a page's: no query per item), each list in vote order."""
    found: dict[int, list[Vote]] = {override_id: [] for override_id in override_ids}
    if override_ids:
        query = select(Vote).where(col(Vote.override_id).in_(list(override_ids))).order_by(col(Vote.id))
        for vote in session.exec(query):
            found[vote.override_id].append(vote)
    return found
