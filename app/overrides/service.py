"""Taking requests and finding overrides: a new request is authorised, validated, given its evidence and
inserted (`create_override`); the API's lists and filters. Decisions about an existing override are in
`decisions.py`, its states and transitions in `lifecycle.py`, who may do what in `permissions.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, bindparam, func
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.auth import Principal
from app.core.db import utcnow
from app.core.errors import Conflict, FieldError, InvalidInput
from app.core.person import person_key
from app.core.text import decode_cursor
from app.overrides import reads
from app.overrides.decisions import approvals_needed
from app.overrides.evidence import Evidence
from app.overrides.lifecycle import find_live, snapshot
from app.overrides.models import Override, OverrideState, Vote
from app.overrides.permissions import ActionContext, refuse, visible_to
from app.overrides.postfix import PolicyInputError, normalise_destination
from app.overrides.reads import ANSWER_COLUMNS, Answered
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


# A page's statement for each shape of request (which filters are set, how many states, who may see what):
# made once, the values are its parameters. The shapes are few (at most a few thousand combinations).
_PAGES: dict[tuple[Any, ...], Select[Any]] = {}


def page_query(
    principal: Principal, filters: OverrideFilter, cursor: str | None, limit: int
) -> tuple[Select[Any], dict[str, Any]]:
    """A list page, newest first, stable under inserts (keyset pagination on the id): one statement that
    selects `limit + 1` overrides (to tell whether a next page exists) with their votes joined
    (`reads.with_votes`; `reads.page_of` makes the page of its rows), so the page and its votes are one
    snapshot and one round trip. Returns the statement and its parameters."""
    visible, caller = visible_to(principal)
    params: dict[str, Any] = dict(caller)
    states = sorted({OverrideState(s).value for s in filters.state or ()})
    params |= {f"state_{i}": state for i, state in enumerate(states)}
    if filters.destination:
        params["destination"] = _normalised_or_raw(filters.destination)
    if filters.requester:
        params["requester"] = person_key(filters.requester)
    if filters.ticket:
        params["ticket"] = filters.ticket.lower()
    if filters.target:
        params["target"] = filters.target
    if filters.overdue is not None:
        params |= {"removing": OverrideState.removing.value, "now": utcnow()}
    after = decode_cursor("o", cursor)
    if after is not None:
        params["after"] = after
    params["limit"] = limit + 1
    shape = (filters.overdue, *sorted(params))  # the names say which conditions there are (and how many states)
    statement = _PAGES.get(shape)
    if statement is None:
        statement = _PAGES[shape] = _page_statement(visible, len(states), params, filters.overdue)
    return statement, params


def _page_statement(
    visible: ColumnElement[bool] | None, states: int, params: dict[str, Any], overdue: bool | None
) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = [] if visible is None else [visible]
    if states:
        conditions.append(col(Override.state).in_([bindparam(f"state_{i}") for i in range(states)]))
    if "destination" in params:
        conditions.append(col(Override.destination) == bindparam("destination"))
    if "requester" in params:
        conditions.append(col(Override.requested_by_key) == bindparam("requester"))
    if "ticket" in params:
        # Case-insensitive (an integration's `mail-4711` finds `MAIL-4711`), served by the index on lower(ticket).
        conditions.append(func.lower(Override.ticket) == bindparam("ticket"))
    if "target" in params:
        conditions.append(col(Override.target) == bindparam("target"))
    if overdue is not None:
        late = (col(Override.state) == bindparam("removing")) & (col(Override.removal_deadline) < bindparam("now"))
        conditions.append(late if overdue else ~late)
    if "after" in params:
        conditions.append(col(Override.id) < bindparam("after"))
    page = (
        sa_select(*ANSWER_COLUMNS)
        .where(*conditions)
        .order_by(col(Override.id).desc())
        .limit(bindparam("limit", type_=Integer))
        .cte("page")
    )
    return reads.with_votes(page)


def list_overrides(
    session: Session, principal: Principal, filters: OverrideFilter, cursor: str | None, limit: int
) -> tuple[list[Answered], str | None]:
    """`page_query`'s page in `session`: the overrides (Core rows of `reads.ANSWER_COLUMNS`), and the cursor
    of the next page."""
    statement, params = page_query(principal, filters, cursor, limit)
    page, next_cursor = reads.page_of(session.execute(statement, params).all(), limit)
    return [override for override, _ in page], next_cursor


def votes_of(session: Session, override_id: int) -> list[Vote]:
    return list(session.exec(select(Vote).where(Vote.override_id == override_id).order_by(col(Vote.id))).all())
