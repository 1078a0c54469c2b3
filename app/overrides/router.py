"""HTTP routes of the override workflow: take input, resolve the caller, call one service function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel, TypeAdapter
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.audit.chain import as_dict
from app.audit.schemas import EventRead
from app.audit.service import iter_events
from app.core.auth import CurrentPrincipal, Principal
from app.core.db import SessionDep, async_statements, read_rows, request_session
from app.core.errors import NotFound, problem_responses
from app.core.idempotency import REPLAYED_HEADER, Idempotency, IdempotencyKey, answer_once, fingerprint
from app.core.text import MAX_ID, Filter
from app.overrides import decisions, service
from app.overrides.briefs import brief_page, kept_briefs
from app.overrides.evidence import Evidence
from app.overrides.models import Override, OverrideState
from app.overrides.permissions import ActionContext, can_see, load_visible
from app.overrides.reads import (
    ONE_WITH_VOTES,
    Answered,
    brief_page_json,
    one_with_votes,
    page_of,
    read_json,
    to_read,
    vote_reads,
)
from app.overrides.schemas import (
    ActionBody,
    ExtendBody,
    OverrideBrief,
    OverrideCreate,
    OverridePage,
    OverrideRead,
    OverrideView,
    ResolveConflictBody,
)

router = APIRouter(prefix="/v1/overrides", tags=["overrides"])

OverrideId = Annotated[int, Path(ge=1, le=MAX_ID, description="The override's id.")]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description=(
            'The override\'s `ETag` from the answer you decided on, e.g. `"3"`: the action happens only if the '
            "override is still at that version, else 412 (`precondition-failed`) and nothing changes. Weak tags "
            '(`W/"3"`, as compressing proxies send them back) count as the same version; a comma-separated '
            "list matches if any tag does; `*` matches any version. Without it the action goes ahead, unless the "
            "service runs with `TLSO_REQUIRE_IF_MATCH=true`: then 428 (`precondition-required`)."
        ),
    ),
]
ETAG_HEADER = {
    "ETag": {"description": "The override's version, for If-Match.", "required": True, "schema": {"type": "string"}}
}
ACTIONS = ("approve", "reject", "cancel", "revoke", "extend", "resolve-conflict")
# OpenAPI links: from an answer that carries an override, each action on it with its id and its ETag as
# If-Match (how a client should chain them; Schemathesis' stateful phase follows them too).
ACTION_LINKS = {
    action: {
        "operationRef": f"#/paths/~1v1~1overrides~1{{override_id}}~1{action}/post",
        "parameters": {"path.override_id": "$response.body#/id", "header.If-Match": "$response.header.ETag"},
        "description": f"`{action}` this override, at the version just read.",
    }
    for action in ACTIONS
}


# Routes that answer a model serialise it once, here, exactly as FastAPI's own fast path for their
# `response_model` would (the same TypeAdapter.dump_json): a route that returns a model from a plain `def`
# has it validated again in one more hop to the thread pool and back, and these are the hot routes.
_OVERRIDE_JSON = TypeAdapter(OverrideRead)
_PAGE_JSON = TypeAdapter(OverridePage)


def _json(adapter: TypeAdapter[Any], value: Any, response: Response, status: int = 200) -> Response:
    """`value` as JSON, with the status and headers set on `response` (FastAPI's per-request response)."""
    return _encoded(adapter.dump_json(value, by_alias=True), response, status)


def _encoded(body: bytes, response: Response, status: int = 200) -> Response:
    answer = Response(body, status_code=response.status_code or status, media_type="application/json")
    answer.headers.raw.extend(response.headers.raw)
    return answer


def _answer(
    session: Session, ctx: ActionContext, response: Response, change: Callable[[], Override], status: int = 200
) -> Response:
    """The override as the change left it, with its ETag (and, when created, its Location); kept for a retry
    with the same Idempotency-Key, which gets this answer again."""

    def changed() -> tuple[OverrideRead, dict[str, str]]:
        override = change()
        if status == 201:
            return _created(override)
        # A vote leaves the override's votes as it read them under the lock: no query for them then.
        known = ctx.votes.get(override.id or 0)
        votes = vote_reads(service.votes_of(session, override.id or 0) if known is None else known)
        return to_read(override, votes), {"ETag": f'"{override.version}"'}

    return _json(_OVERRIDE_JSON, answer_once(ctx.idempotency, response, status, OverrideRead, changed), response)


def _context(
    request: Request,
    principal: Principal,
    session: Session | None,
    body: BaseModel,
    idempotency_key: str | None,
    if_match: str | None = None,
) -> ActionContext:
    settings = request.app.state.settings
    idempotency = None
    if idempotency_key is not None:
        print_ = fingerprint("POST", request.url.path, body.model_dump(mode="json"))
        idempotency = Idempotency(principal, idempotency_key, print_, settings.idempotency_ttl)
    return ActionContext(
        principal=principal,
        settings=settings,
        engine=request.app.state.engine,
        if_match=if_match,
        session=session,
        idempotency=idempotency,
    )


@router.post(
    "",
    status_code=201,
    response_model=OverrideRead,
    summary="Request an override",
    responses={
        201: {
            "headers": {
                **ETAG_HEADER,
                "Location": {"description": "The new override's URL.", "required": True, "schema": {"type": "string"}},
                **REPLAYED_HEADER,
            },
            "links": ACTION_LINKS,
        },
        **problem_responses(400, 401, 403, 409, 422),
    },
)
async def create_override(
    request: Request,
    body: OverrideCreate,
    principal: CurrentPrincipal,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Ask for a temporary TLS policy override. The domain is diagnosed and the evidence stored with it."""
    state = request.app.state
    evidence = Evidence(state.diagnosis_limiter, state.recent_diagnoses, queue_reader=state.queue_reader)
    db = async_statements(request)
    if db is None or idempotency_key is not None:
        # SQLite, or a key to claim first (app/core/idempotency.py): the ORM's path in the thread pool, in
        # the request's session, committed before the answer as `SessionDep` commits every other change.
        async with request_session(request) as session:
            ctx = _context(request, principal, session, body, idempotency_key)

            def create() -> Override:
                return service.create_override(session, ctx, body, evidence)

            return await run_in_threadpool(_answer, session, ctx, response, create, 201)
    # One statement in a transaction of its own (`AsyncReads.write`): no session.
    ctx = _context(request, principal, None, body, None)
    override = await service.create_override_at_once(db, ctx, body, evidence)
    response.headers.update(_created_headers(override))
    return _encoded(read_json(override, []), response, 201)  # no key: nothing to keep for a retry


def _created(override: Answered) -> tuple[OverrideRead, dict[str, str]]:
    """A new override's answer (it has no votes yet) and its headers."""
    return to_read(override, []), _created_headers(override)


def _created_headers(override: Answered) -> dict[str, str]:
    return {"ETag": f'"{override.version}"', "Location": f"/v1/overrides/{override.id}"}


@router.get("", response_model=OverridePage, summary="List overrides", responses=problem_responses(401, 422))
async def list_overrides(
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    state: Annotated[list[OverrideState] | None, Query(description="Repeat to match several states.")] = None,
    destination: Filter = None,
    requester: Filter = None,
    ticket: Filter = None,
    target: Filter = None,
    overdue: bool | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    view: Annotated[
        OverrideView,
        Query(
            description="`compact` (default): each item is an `OverrideBrief` — summary, request, state, findings "
            "and links, without the diagnosis and the vote history; `full`: each item as `GET /v1/overrides/{id}` "
            "answers it (`OverrideRead`)."
        ),
    ] = "compact",
) -> Response:
    """Newest first. Requesters see their own; reviewers, admins and auditors see all; an integration sees
    the ones submitted through it (`requested_via` = its client id) and those of the user it acts for."""
    filters = service.OverrideFilter(
        state=state, destination=destination, requester=requester, ticket=ticket, target=target, overdue=overdue
    )
    # `async`: on PostgreSQL the statements run on the event loop; briefs encoded before are kept (briefs.py).
    db = async_statements(request)
    cache = kept_briefs(request.app.state) if db is not None and view == "compact" else None  # PostgreSQL's only
    if db is not None and cache is not None:
        statement, params = service.page_query(principal, filters, cursor, limit, stamps=True)
        body = await brief_page(db, cache, statement, params, limit)
        if body is not None:
            return _encoded(body, response)
    statement, params = service.page_query(principal, filters, cursor, limit)
    page, next_cursor = page_of(await read_rows(request, statement, params), limit)

    def answer() -> Response:
        if view == "compact":
            return _encoded(brief_page_json(page, next_cursor), response)
        items: list[OverrideRead | OverrideBrief] = [to_read(override, votes) for override, votes in page]
        return _json(_PAGE_JSON, OverridePage(items=items, next_cursor=next_cursor), response)

    # A default page of briefs is built on the event loop (≈ 1 ms); full items carry whole diagnoses and a
    # long page takes several times that, so those are built in the thread pool, not blocking every request.
    return await run_in_threadpool(answer) if view == "full" or len(page) > 50 else answer()


@router.get(
    "/{override_id}",
    response_model=OverrideRead,
    summary="Get one override",
    responses={200: {"headers": ETAG_HEADER, "links": ACTION_LINKS}, **problem_responses(401, 404, 422)},
)
async def get_override(
    request: Request, override_id: OverrideId, principal: CurrentPrincipal, response: Response
) -> Response:
    # `async`: the read is one statement on the event loop on PostgreSQL (app/core/db.py, `read_rows`).
    found = one_with_votes(await read_rows(request, ONE_WITH_VOTES, {"override_id": override_id}))
    if found is None or not can_see(principal, found[0]):
        raise NotFound(f"Override {override_id} does not exist.")
    override, votes = found
    response.headers["ETag"] = f'"{override.version}"'
    return _encoded(read_json(override, votes), response)


@router.get(
    "/{override_id}/events",
    response_model=list[EventRead],
    summary="The override's audit trail",
    responses=problem_responses(401, 404, 422),
)
def override_events(override_id: OverrideId, session: SessionDep, principal: CurrentPrincipal) -> list[EventRead]:
    load_visible(session, principal, override_id)
    return [EventRead.model_validate(as_dict(e)) for e in iter_events(session, override_id=override_id)]


ACTION_ERRORS = problem_responses(400, 401, 403, 404, 409, 412, 422, 428)


Call = Callable[[Session, ActionContext, int, Any], Override]


def _action_route(
    name: str, summary: str, description: str, body_type: type[ActionBody], call: Call, *, operation: str = ""
) -> None:
    """Register `POST /v1/overrides/{id}/{name}`: one shape for every action (If-Match, Idempotency-Key,
    the override and its ETag in the answer); only the service call differs."""

    def endpoint(
        request: Request,
        override_id: OverrideId,
        body: ActionBody,
        session: SessionDep,
        principal: CurrentPrincipal,
        response: Response,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        ctx = _context(request, principal, session, body, idempotency_key, if_match)
        return _answer(session, ctx, response, lambda: call(session, ctx, override_id, body))

    endpoint.__annotations__["body"] = body_type  # FastAPI reads the body model from the signature
    endpoint.__name__ = endpoint.__qualname__ = operation or f"{name}_override"  # the operationId's stem
    endpoint.__doc__ = description
    router.post(
        f"/{{override_id}}/{name}",
        response_model=OverrideRead,
        summary=summary,
        responses={200: {"headers": {**ETAG_HEADER, **REPLAYED_HEADER}, "links": ACTION_LINKS}, **ACTION_ERRORS},
    )(endpoint)


_action_route(
    "approve",
    "Approve (request or extension)",
    "Vote to approve. Nobody approves their own request; enough approvals make it `approved`.",
    ActionBody,
    lambda session, ctx, oid, body: decisions.approve(session, ctx, oid, body.comment),
)
_action_route(
    "reject",
    "Reject (request or extension)",
    "Reject a pending request, or only the pending extension of an active override.",
    ActionBody,
    lambda session, ctx, oid, body: decisions.reject(session, ctx, oid, body.comment),
)
_action_route(
    "cancel",
    "Cancel your own request or override",
    "Withdraw a request; once applied, the worker removes the mailcow row first (state `removing`).",
    ActionBody,
    lambda session, ctx, oid, body: decisions.cancel(session, ctx, oid, body.comment),
)
_action_route(
    "revoke",
    "Revoke an override (admin)",
    "End an approved or active override now.",
    ActionBody,
    lambda session, ctx, oid, body: decisions.revoke(session, ctx, oid, body.comment),
)
_action_route(
    "extend",
    "Ask for more time",
    "Request an extension; it takes effect when approved, without a gap and with the same mailcow row.",
    ExtendBody,
    lambda session, ctx, oid, body: decisions.extend(session, ctx, oid, body.duration, body.comment),
)
_action_route(
    "resolve-conflict",
    "Decide about a foreign mailcow row (admin)",
    "An approved override whose destination already has a row tlsoverride did not write waits here.\n"
    "The row is never overwritten silently; its snapshot is in the override's `conflict` field.",
    ResolveConflictBody,
    lambda session, ctx, oid, body: decisions.resolve_conflict(session, ctx, oid, body.action, body.comment),
    operation="resolve_conflict",
)
