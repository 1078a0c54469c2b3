"""The mailcow targets: their status, and each one's live TLS policy map with ownership and drift."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from app.core.auth import CurrentPrincipal, Principal, require
from app.core.db import SessionDep
from app.core.errors import problem_responses
from app.overrides.permissions import ActionContext
from app.overrides.schemas import ActionBody
from app.targets import queue, service
from app.targets.schemas import TargetPolicies, TargetQueue, TargetRead

router = APIRouter(prefix="/v1/targets", tags=["targets"])
Reader = Annotated[Principal, require("approver", "admin", "auditor")]
QueueReader = Annotated[Principal, require("approver", "admin")]
TargetName = Annotated[str, Path(max_length=100, description="The target's name (see `GET /v1/targets`).")]


@router.get("", response_model=list[TargetRead], summary="mailcow targets", responses=problem_responses(401, 403, 422))
def list_targets(request: Request, session: SessionDep, _: Reader) -> list[TargetRead]:
    """Each configured mailcow instance: last reconcile, pause after auth failures, row counts."""
    return service.list_targets(session, request.app.state.settings)


@router.get(
    "/{name}/policies",
    response_model=TargetPolicies,
    summary="The live TLS policy map of a target",
    responses=problem_responses(401, 403, 404, 422, 503),
)
async def target_policies(request: Request, name: TargetName, _: Reader) -> TargetPolicies:
    """Read from mailcow now. `owned_by` names the override that owns a row (null: not ours, never
    touched); `drift` says how an owned row differs from its override; `missing` lists active
    overrides whose row is gone."""
    return await service.live_policies(request.app.state.engine, request.app.state.settings, name)


@router.get(
    "/{name}/queue",
    response_model=TargetQueue,
    summary="What the target's mail queue holds deferred (approver, admin)",
    responses=problem_responses(401, 403, 404, 422, 503),
)
async def target_queue(
    request: Request,
    name: TargetName,
    _: QueueReader,
    destination: Annotated[
        str | None,
        Query(
            max_length=300,
            description="A destination as an override names it (`example.org`, `.example.org`); without it, "
            "every recipient domain with deferred mail.",
        ),
    ] = None,
) -> TargetQueue:
    """Read from mailcow now: deferred messages and recipients per destination, the oldest arrival and the
    distinct delay reasons, each with the diagnosis's failure class where it matches. Counts, reasons and
    times only: never senders, recipients' local parts or content. A next hop is not attributable."""
    return await queue.target_queue(request.app.state.engine, request.app.state.settings, name, destination)


@router.post(
    "/{name}/resume",
    response_model=TargetRead,
    summary="End a target's pause now (admin)",
    responses=problem_responses(400, 401, 403, 404, 409, 422),
)
def resume_target(
    request: Request, name: TargetName, body: ActionBody, session: SessionDep, principal: CurrentPrincipal
) -> TargetRead:
    """After mailcow refused the API key, calls to the target pause (mailcow bans an IP after 10 failed
    logins). Restarting with a corrected key ends the pause by itself; this ends it now — say why, e.g.
    the key's allowed IPs were fixed in mailcow. Every apply and removal that waited is due at once,
    removals first. 409 when the target is not paused."""
    ctx = ActionContext(
        principal=principal, settings=request.app.state.settings, engine=request.app.state.engine, session=session
    )
    return service.resume_target(session, ctx, name, body.comment)
