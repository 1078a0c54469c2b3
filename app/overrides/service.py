"""Taking requests and finding overrides: a new request is authorised, validated, given its evidence and
inserted (`create_override`); the API's lists and filters. Decisions about an existing override are in
`decisions.py`, its states and transitions in `lifecycle.py`, who may do what in `permissions.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import anyio.to_thread
from sqlalchemy import ColumnElement, Integer, Select, bindparam, func, text
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.selectable import TextualSelect
from sqlmodel import Session, col, select

from app.audit.chain import new_entry
from app.audit.service import append_parameters, append_with, record
from app.core.auth import Principal
from app.core.db import AsyncReads, utcnow
from app.core.errors import Conflict, FieldError, InvalidInput
from app.core.person import person_key
from app.core.text import decode_cursor
from app.overrides import reads
from app.overrides.decisions import approvals_needed
from app.overrides.evidence import Evidence, Found, WouldBlock
from app.overrides.lifecycle import find_live, snapshot_of
from app.overrides.models import Override, OverrideState, Vote
from app.overrides.permissions import ActionContext, refuse, visible_to
from app.overrides.postfix import PolicyInputError, normalise_destination
from app.overrides.reads import ANSWER_COLUMNS, Answered
from app.overrides.schemas import OverrideCreate
from app.overrides.validation import validate_request


def create_override(session: Session, ctx: ActionContext, body: OverrideCreate, evidence: Evidence) -> Override:
    """Take a new request: authorise, validate, gather its evidence, insert it (pending, or approved at once
    for auto-approved policies)."""
    principal = ctx.principal
    if not principal.has("requester", "admin"):
        raise refuse(ctx, None, "create", principal.lacks("requester", "admin", to="request overrides"))
    request = validate_request(body, ctx.settings)
    # The probes run before `session` is first used: on SQLite its transaction holds the only write lock.
    found = evidence.gather(ctx, *request[:2], body.policy, request[2]), evidence.queue(ctx, *request[:2])
    ctx.claim(session)
    refused = _refused(found[0][1])
    if refused is not None:
        _refuse_if_live(session, *request[:2])  # a 409 comes before the 400
        raise refused
    values = _new_values(ctx, body, request, found)
    override = Override(**values)
    session.add(override)
    try:
        session.flush()
    except IntegrityError as exc:
        # The destination has a live override: the partial unique index is the check (no look before the
        # INSERT, one round trip less), also against a request that raced this one. Name the override.
        session.rollback()
        _refuse_if_live(session, *request[:2])
        raise _live_conflict(*request[:2]) from exc
    for entry in _created_entries(ctx, body, request, values):
        record(session, override_id=override.id, **entry)
    return override


async def create_override_at_once(
    db: AsyncReads, ctx: ActionContext, body: OverrideCreate, evidence: Evidence
) -> Answered:
    """`create_override` on PostgreSQL without an Idempotency-Key, from the event loop: the override and
    its audit entries are one statement (`append_with`) in a transaction of its own, one round trip and
    no thread; the evidence is gathered in a thread if that means I/O.
    The same checks in the same order, the same rows, the same answer (tests/overrides/test_create.py)."""
    principal = ctx.principal
    if not principal.has("requester", "admin"):
        reason = principal.lacks("requester", "admin", to="request overrides")
        raise await anyio.to_thread.run_sync(refuse, ctx, None, "create", reason)
    request = validate_request(body, ctx.settings)
    target, destination = request[:2]

    def gather(blocking: bool = True) -> tuple[Found, dict[str, Any] | None]:
        return evidence.gather(ctx, target, destination, body.policy, request[2], blocking=blocking), evidence.queue(
            ctx, target, destination, blocking=blocking
        )

    try:
        found = gather(blocking=False)  # no diagnosis and no mailcow: put together here, no thread
    except WouldBlock:  # a diagnosis, the database, mailcow's queue: in a thread
        found = await anyio.to_thread.run_sync(gather)
    refused = _refused(found[0][1])
    if refused is not None:
        await _refuse_if_live_at_once(db, target, destination)
        raise refused
    values = _new_values(ctx, body, request, found)  # the columns' values; no `Override` is needed here
    entries = [new_entry(**entry) for entry in _created_entries(ctx, body, request, values)]
    try:
        rows = await db.write(_created_statement(len(entries)), values | append_parameters(entries, about_subject=True))
    except IntegrityError as exc:
        await _refuse_if_live_at_once(db, target, destination)
        raise _live_conflict(target, destination) from exc
    return cast(Answered, rows[0])


Request = tuple[str, str, str, timedelta]  # target, destination, parameters, duration: `validate_request`'s


def _refused(findings: list[dict[str, Any]] | None) -> InvalidInput | None:
    """The 400 for findings that refuse the request (TLSO_REFUSE_RULES), or None."""
    refused = [f for f in findings or [] if f.get("refused")]
    if not refused:
        return None
    return InvalidInput(
        "; ".join(str(f["message"]) for f in refused),
        errors=[FieldError(field="body.policy", message=str(f["message"])) for f in refused],
    )


def _new_values(
    ctx: ActionContext, body: OverrideCreate, request: Request, found: tuple[Found, dict[str, Any] | None]
) -> dict[str, Any]:
    """A new override's value of every column but the id (those it does not set: the column's default)."""
    principal, settings = ctx.principal, ctx.settings
    target, destination, parameters, duration = request
    (diagnosis, findings), queue = found
    now = utcnow()
    required = approvals_needed(body.policy, settings)
    auto = required == 0
    return _DEFAULTS | dict(
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


def _created_entries(
    ctx: ActionContext, body: OverrideCreate, request: Request, values: dict[str, Any]
) -> list[dict[str, Any]]:
    """The audit entries of a new override (`record`'s arguments but its id): created, and auto-approved."""
    principal = ctx.principal
    entries: list[dict[str, Any]] = [
        {
            "actor": principal.actor,
            "via": principal.via,
            "action": "override.created",
            "after": snapshot_of(values)
            | {
                "duration": body.duration or request[3],
                "justification": values["justification"],
                "ticket": values["ticket"],
            },
            "comment": values["justification"],
        }
    ]
    if values["approvals_required"] == 0:
        entries.append(
            {
                "actor": "system",
                "action": "override.auto_approved",
                "after": snapshot_of(values),
                "comment": f"policy {body.policy} is stronger than the default",
            }
        )
    return entries


def _live_conflict(target: str, destination: str) -> Conflict:
    return Conflict(f"A live override for {destination} on {target} already exists.")


def _refuse_if_live(session: Session, target: str, destination: str) -> None:
    _refuse_live(find_live(session, target, destination), target, destination)


async def _refuse_if_live_at_once(db: AsyncReads, target: str, destination: str) -> None:
    rows = await db.rows(LIVE, {"target": target, "destination": destination})
    _refuse_live(rows[0] if rows else None, target, destination)


def _refuse_live(existing: tuple[int | None, str] | None, target: str, destination: str) -> None:
    if existing is not None:
        existing_id, state = existing
        raise Conflict(
            f"Override {existing_id} for {destination} on {target} is still {state}.",
            existing=f"/v1/overrides/{existing_id}",
        )


_OVERRIDE = Override.__table__  # type: ignore[attr-defined]
_INSERTED = tuple(c for c in _OVERRIDE.c if c.key != "id")
# What a new `Override` holds in the columns `_new_values` does not set (none has a default factory).
_DEFAULTS = {c.key: field.get_default() for c in _INSERTED if not (field := Override.model_fields[c.key]).is_required()}
_QUOTE = postgresql.dialect().identifier_preparer.quote  # type: ignore[no-untyped-call]
_INSERT = (
    f"INSERT INTO {_QUOTE(_OVERRIDE.name)} ({', '.join(_QUOTE(c.name) for c in _INSERTED)}) "  # noqa: S608
    f"VALUES ({', '.join(f':{c.key}' for c in _INSERTED)}) "
    f"RETURNING {', '.join(_QUOTE(c.name) for c in ANSWER_COLUMNS)}"
)
_CREATED: dict[int, TextualSelect] = {}


def _created_statement(entries: int) -> TextualSelect:
    """PostgreSQL: a new override and its `entries` audit entries in one statement, returning the override
    as `ANSWER_COLUMNS` (made once per number of entries: 1, or 2 when auto-approved)."""
    statement = _CREATED.get(entries)
    if statement is None:
        statement = _CREATED[entries] = (
            text(append_with(_INSERT, entries))
            .bindparams(*(bindparam(c.key, type_=c.type) for c in _INSERTED))
            .columns(*ANSWER_COLUMNS)
        )
    return statement


# The live override of a destination, its id and state (what a 409 names), as `find_live` reads it.
LIVE: Select[Any] = (
    sa_select(_OVERRIDE.c.id, _OVERRIDE.c.state)
    .where(
        _OVERRIDE.c.target == bindparam("target"),
        _OVERRIDE.c.destination == bindparam("destination"),
        _OVERRIDE.c.live.is_(True),
    )
    .limit(1)
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
    principal: Principal, filters: OverrideFilter, cursor: str | None, limit: int, *, stamps: bool = False
) -> tuple[Select[Any], dict[str, Any]]:
    """A list page, newest first, stable under inserts (keyset pagination on the id): one statement that
    selects `limit + 1` overrides (to tell whether a next page exists) with their votes joined
    (`reads.with_votes`; `reads.page_of` makes the page of its rows), so the page and its votes are one
    snapshot and one round trip. With `stamps`, the same overrides as the keys of their encoded briefs
    (`reads.with_stamps`, for app/overrides/briefs.py). Returns the statement and its parameters."""
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
    # The names say which conditions there are (and how many states).
    shape = (stamps, filters.overdue, *sorted(params))
    statement = _PAGES.get(shape)
    if statement is None:
        statement = _PAGES[shape] = _page_statement(visible, len(states), params, filters.overdue, stamps)
    return statement, params


def _page_statement(
    visible: ColumnElement[bool] | None, states: int, params: dict[str, Any], overdue: bool | None, stamps: bool
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
        sa_select(*(reads.STAMP_COLUMNS if stamps else ANSWER_COLUMNS))
        .where(*conditions)
        .order_by(col(Override.id).desc())
        .limit(bindparam("limit", type_=Integer))
        .cte("page")
    )
    return reads.with_stamps(page) if stamps else reads.with_votes(page)


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
