"""`POST /slack/interactions` and `POST /slack/commands`: what Slack sends, answered as Slack expects.

Slack wants an answer within 3 seconds. Everything is done inside the request: a decision is one short
transaction, and `/tlso request` diagnoses the domain for at most `DIAGNOSIS_BUDGET_SECONDS` — past that
the request is taken without evidence, as the API does when a caller's diagnosis budget is spent (an
urgent request never waits), and the reply says so. Only the update of a clicked message goes to its
`response_url` after the answer (best effort: the decision is committed before Slack hears anything,
and a channel sink's chat.update shows it as well).

A request that is not Slack's (no or a wrong signature, stale, replayed) gets an RFC 9457 problem;
anything Slack sent with a valid signature gets a 200 with a message for the person, refusals included.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

import httpx
from fastapi import APIRouter, BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.core.auth import Principal
from app.core.config import Settings
from app.core.errors import MalformedBody, problem_responses
from app.notify import slack_web as web
from app.notify.slack_blocks import escape, override_message
from app.overrides import service
from app.overrides.evidence import Evidence
from app.overrides.schemas import OverrideCreate
from app.slack import service as slack
from app.slack.commands import USAGE, Command, CommandError, parse

log = logging.getLogger("app.slack")
router = APIRouter(prefix="/slack", tags=["slack"])
DIAGNOSIS_BUDGET_SECONDS = 2.0


def _responses(description: str) -> dict[int | str, dict[str, Any]]:
    responses = problem_responses(400, 401, 404, 500, 503)
    # Slack's requests carry no bearer token: a refused one gets no bearer challenge.
    responses[401] = {key: value for key, value in responses[401].items() if key != "headers"}
    return {200: {"description": description}, **responses}


def _form_body(field_doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": field_doc, "additionalProperties": {"type": "string"}}
                }
            },
        },
        "parameters": [
            {
                "name": "X-Slack-Request-Timestamp",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "Unix time of the request; more than 5 minutes away is refused.",
            },
            {
                "name": "X-Slack-Signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "`v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{body}` with the app's signing secret.",
            },
        ],
    }


async def _verified(request: Request) -> tuple[bytes, dict[str, list[str]]]:
    body = await request.body()
    headers = {key.lower(): value for key, value in request.headers.items()}
    await run_in_threadpool(slack.verify, request.app.state.engine, request.app.state.settings, body, headers)
    try:
        return body, parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise MalformedBody("The body is not UTF-8 form data.") from None


def _field(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[0]


@router.post(
    "/interactions",
    summary="Slack interactivity: the Approve / Reject buttons",
    response_class=Response,
    responses=_responses("Taken (Slack expects an empty 200); the clicked message is updated via `response_url`."),
    openapi_extra=_form_body({"payload": {"type": "string", "description": "The interaction, as JSON."}}),
)
async def interactions(request: Request, background: BackgroundTasks) -> Response:
    """Set as the Slack app's *Interactivity Request URL*. A mapped reviewer's click approves or rejects as
    that person `via` Slack, at the version the message showed (If-Match)."""
    _, form = await _verified(request)
    try:
        payload = json.loads(_field(form, "payload"))
    except json.JSONDecodeError:
        raise MalformedBody("The form field `payload` is not JSON.") from None
    if not isinstance(payload, dict):
        raise MalformedBody("The form field `payload` is not a JSON object.")
    settings: Settings = request.app.state.settings
    slack.check_team(settings, str(slack.field(payload, "team", "id")))
    if payload.get("type") != "block_actions":
        return Response(status_code=200)
    message, _ = await run_in_threadpool(slack.button_click, request.app.state.engine, settings, payload)
    response_url = payload.get("response_url")
    if isinstance(response_url, str) and response_url.startswith(("https://", "http://")):
        background.add_task(_respond, response_url, message)
    return Response(status_code=200)


async def _respond(response_url: str, message: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as http:
        await web.respond(http, response_url, message)


@router.post(
    "/commands",
    summary="Slack slash command `/tlso`",
    response_model=None,
    responses=_responses("The reply Slack shows the person (JSON, `response_type: ephemeral`)."),
    openapi_extra=_form_body(
        {
            "command": {"type": "string", "example": "/tlso"},
            "text": {"type": "string", "example": "show 42"},
            "user_id": {"type": "string"},
            "team_id": {"type": "string"},
            "response_url": {"type": "string"},
        }
    ),
)
async def commands(request: Request) -> JSONResponse:
    """Set as the Slack app's slash command *Request URL*: `/tlso help|list|show|approve|reject|request`
    (the grammar is in the README)."""
    _, form = await _verified(request)
    settings: Settings = request.app.state.settings
    engine = request.app.state.engine
    slack.check_team(settings, _field(form, "team_id"))
    user_id = _field(form, "user_id")
    try:
        command = parse(_field(form, "text"))
    except CommandError as exc:
        return JSONResponse(slack.ephemeral(escape(str(exc))))
    if command.name == "help":
        return JSONResponse(slack.ephemeral(f"Usage: {USAGE}"))
    principal = slack.principal_for(settings, user_id)
    if principal is None:
        reply = await run_in_threadpool(slack.unmapped, engine, settings, user_id, command.name, command.override_id)
        return JSONResponse(reply)
    if command.name == "request":
        return JSONResponse(await _request_override(request.app, principal, command))
    return JSONResponse(await run_in_threadpool(slack.command_reply, engine, settings, principal, command))


async def _request_override(app: FastAPI, principal: Principal, command: Command) -> dict[str, Any]:
    settings: Settings = app.state.settings
    try:
        body = OverrideCreate.model_validate(command.request)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return slack.ephemeral(f"Not requested: {escape(problems)}")
    # Taken as the API takes it, but the diagnosis gets only what Slack's 3 s leave: past that, the request
    # is taken without evidence (as the API does when a caller's diagnosis budget is spent).
    evidence = Evidence(app.state.diagnosis_limiter, app.state.recent_diagnoses, time_limit=DIAGNOSIS_BUDGET_SECONDS)
    created, refused = await run_in_threadpool(
        slack.act,
        app.state.engine,
        settings,
        principal,
        lambda session, ctx: service.create_override(session, ctx, body, evidence),
    )
    if refused is not None:
        return slack.ephemeral(f"Not requested: {escape(refused)}")
    assert created is not None
    note = "Requested; reviewers decide with the buttons or `/tlso approve`."
    if created.diagnosis is not None and created.diagnosis.error:
        note += f" Taken without a diagnosis ({escape(created.diagnosis.error)})."
    return {"response_type": "ephemeral", **override_message(created, note)}
