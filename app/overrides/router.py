"""HTTP routes of the override workflow: take input, resolve the caller, call one service function."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session

from app.audit.service import as_dict, iter_events
from app.core.auth import CurrentPrincipal, Principal
from app.core.config import Settings
from app.core.db import SessionDep
from app.core.errors import NotFound, problem_responses
from app.core.idempotency import REPLAYED_HEADER, IdempotencyKey, fingerprint, run_idempotent
from app.core.text import MAX_ID, Filter
from app.overrides import service
from app.overrides.evidence import gather_evidence
from app.overrides.models import Override, OverrideState
from app.overrides.schemas import (
    ActionBody,
    EventRead,
    ExtendBody,
    FindingRead,
    OverrideCreate,
    OverridePage,
    OverrideRead,
    PendingExtension,
    ResolveConflictBody,
    VoteRead,
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


def to_read(session: Session, override: Override) -> OverrideRead:
    votes = [
        VoteRead(
            reviewer=v.reviewer,
            reviewer_name=v.reviewer_name,
            via=v.via,
            decision=v.decision,
            comment=v.comment,
            round=v.round,
            at=v.created_at,
        )
        for v in service.votes_of(session, override.id or 0)
    ]
    pending = None
    if override.extension_seconds:
        pending = PendingExtension(
            duration=timedelta(seconds=override.extension_seconds),
            requested_by=override.extension_requested_by or "",
            approvals=[v for v in votes if v.round == override.extension_round and v.decision == "approve"],
        )
    return OverrideRead(
        id=override.id or 0,
        target=override.target,
        destination=override.destination,
        policy=override.policy,
        parameters=override.parameters,
        justification=override.justification,
        ticket=override.ticket,
        ticket_url=override.ticket_url,
        duration=timedelta(seconds=override.duration_seconds),
        state=override.state,
        requested_by=override.requested_by,
        requested_by_name=override.requested_by_name,
        requested_via=override.requested_via,
        approvals=[v for v in votes if v.round == 0 and v.decision == "approve"],
        approvals_required=override.approvals_required,
        votes=votes,
        created_at=override.created_at,
        updated_at=override.updated_at,
        review_deadline=override.review_deadline,
        applied_at=override.applied_at,
        expires_at=override.expires_at,
        ended_at=override.ended_at,
        end_reason=override.end_reason,
        removal_deadline=override.removal_deadline,
        overdue=service.is_overdue(override),
        pending_extension=pending,
        mailcow_id=override.mailcow_id,
        conflict=override.conflict,
        drift=override.drift,
        last_error=override.last_error,
        diagnosis=override.diagnosis,
        findings=[FindingRead.model_validate(f) for f in override.findings or []],
        version=override.version,
        links={"self": f"/v1/overrides/{override.id}", "events": f"/v1/overrides/{override.id}/events"},
    )


def _answer(session: Session, override: Override, status: int = 200) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = to_read(session, override).model_dump(mode="json")
    headers = {"ETag": f'"{override.version}"'}
    if status == 201:
        headers["Location"] = f"/v1/overrides/{override.id}"
    return status, body, headers


def _context(
    request: Request, principal: Principal, if_match: str | None = None, session: Session | None = None
) -> service.ActionContext:
    return service.ActionContext(
        principal=principal,
        settings=request.app.state.settings,
        engine=request.app.state.engine,
        if_match=if_match,
        session=session,
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
def create_override(
    request: Request,
    body: OverrideCreate,
    session: SessionDep,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Ask for a temporary TLS policy override. The domain is diagnosed and the evidence stored with it."""
    ctx = _context(request, principal, session=session)
    settings: Settings = request.app.state.settings
    if not principal.has("requester", "admin"):
        raise service.refuse(ctx, None, "create", "Creating overrides needs the requester role.")
    target, destination, parameters, _ = service.validate_request(body, settings)
    diagnosis, findings = gather_evidence(
        request.app, principal, idempotency_key, target, destination, body.policy, parameters
    )
    return run_idempotent(
        session,
        principal,
        idempotency_key,
        fingerprint("POST", request.url.path, body.model_dump(mode="json")),
        lambda: _answer(
            session, service.create_override(session, ctx, body, diagnosis=diagnosis, findings=findings), 201
        ),
        settings.idempotency_ttl,
    )


@router.get("", response_model=OverridePage, summary="List overrides", responses=problem_responses(401, 422))
def list_overrides(
    session: SessionDep,
    principal: CurrentPrincipal,
    state: Annotated[list[OverrideState] | None, Query(description="Repeat to match several states.")] = None,
    destination: Filter = None,
    requester: Filter = None,
    ticket: Filter = None,
    target: Filter = None,
    overdue: bool | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> OverridePage:
    """Newest first. Requesters see their own; reviewers, admins and auditors see all."""
    rows, next_cursor = service.list_overrides(
        session,
        principal,
        service.OverrideFilter(
            state=state,
            destination=destination,
            requester=requester,
            ticket=ticket,
            target=target,
            overdue=overdue,
        ),
        cursor,
        limit,
    )
    return OverridePage(items=[to_read(session, row) for row in rows], next_cursor=next_cursor)


def _visible(session: Session, principal: Principal, override_id: int) -> Override:
    override = service.load(session, override_id)
    if not service.can_see(principal, override):
        raise NotFound(f"Override {override_id} does not exist.")
    return override


@router.get(
    "/{override_id}",
    response_model=OverrideRead,
    summary="Get one override",
    responses={200: {"headers": ETAG_HEADER, "links": ACTION_LINKS}, **problem_responses(401, 404, 422)},
)
def get_override(override_id: OverrideId, session: SessionDep, principal: CurrentPrincipal) -> JSONResponse:
    status, body, headers = _answer(session, _visible(session, principal, override_id))
    return JSONResponse(body, status_code=status, headers=headers)


@router.get(
    "/{override_id}/events",
    response_model=list[EventRead],
    summary="The override's audit trail",
    responses=problem_responses(401, 404, 422),
)
def override_events(override_id: OverrideId, session: SessionDep, principal: CurrentPrincipal) -> list[EventRead]:
    _visible(session, principal, override_id)
    return [EventRead.model_validate(as_dict(e)) for e in iter_events(session, override_id=override_id)]


ACTION_ERRORS = problem_responses(400, 401, 403, 404, 409, 412, 422, 428)


Call = Callable[[Session, service.ActionContext, int, Any], Override]


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
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = _context(request, principal, if_match, session)
        return run_idempotent(
            session,
            principal,
            idempotency_key,
            fingerprint("POST", request.url.path, body.model_dump(mode="json")),
            lambda: _answer(session, call(session, ctx, override_id, body)),
            request.app.state.settings.idempotency_ttl,
        )

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
    lambda session, ctx, oid, body: service.approve(session, ctx, oid, body.comment),
)
_action_route(
    "reject",
    "Reject (request or extension)",
    "Reject a pending request, or only the pending extension of an active override.",
    ActionBody,
    lambda session, ctx, oid, body: service.reject(session, ctx, oid, body.comment),
)
_action_route(
    "cancel",
    "Cancel your own request or override",
    "Withdraw a request; once applied, the worker removes the mailcow row first (state `removing`).",
    ActionBody,
    lambda session, ctx, oid, body: service.cancel(session, ctx, oid, body.comment),
)
_action_route(
    "revoke",
    "Revoke an override (admin)",
    "End an approved or active override now.",
    ActionBody,
    lambda session, ctx, oid, body: service.revoke(session, ctx, oid, body.comment),
)
_action_route(
    "extend",
    "Ask for more time",
    "Request an extension; it takes effect when approved, without a gap and with the same mailcow row.",
    ExtendBody,
    lambda session, ctx, oid, body: service.extend(session, ctx, oid, body.duration, body.comment),
)
_action_route(
    "resolve-conflict",
    "Decide about a foreign mailcow row (admin)",
    "An approved override whose destination already has a row tlsoverride did not write waits here.\n"
    "The row is never overwritten silently; its snapshot is in the override's `conflict` field.",
    ResolveConflictBody,
    lambda session, ctx, oid, body: service.resolve_conflict(session, ctx, oid, body.action, body.comment),
    operation="resolve_conflict",
)
