"""`/v1/notifications`: the deliveries that failed (dead letters), for admins; and the OpenAPI document's
`webhooks` section: what a JSON sink receives and how to verify it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from pydantic import BaseModel, Field

from app.core.auth import CurrentPrincipal
from app.core.db import SessionDep
from app.core.errors import problem_responses
from app.core.text import MAX_ID, Filter
from app.notify import dead_letters
from app.notify.events import WebhookEvent
from app.notify.models import Notification, NotificationState

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])


class NotificationRead(BaseModel):
    id: int
    sink: str
    seq: int = Field(description="The audit event.")
    webhook_id: str = Field(description="The `webhook-id` every attempt carried (receivers dedupe on it).")
    event_type: str
    override_id: int | None
    state: NotificationState = Field(
        description="`retrying` (its first delivery failed; retried on its own schedule), `failed` (a dead "
        "letter: every attempt failed), `delivered` (a retry got through)."
    )
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    last_status: int | None = Field(description="The receiver's HTTP status, if it answered.")
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] = Field(description="The body exactly as sent (the event; never a secret).")


class NotificationPage(BaseModel):
    items: list[NotificationRead]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page.")


def _read(row: Notification) -> NotificationRead:
    return NotificationRead.model_validate(row, from_attributes=True)


ERRORS = problem_responses(401, 403, 422)


@router.get("", response_model=NotificationPage, summary="Failed deliveries (admin)", responses=ERRORS)
def list_notifications(
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    state: Annotated[
        list[NotificationState] | None, Query(description="`failed` lists the dead letters; repeat for several.")
    ] = None,
    sink: Filter = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> NotificationPage:
    """Newest first: events a sink did not take on the first attempt, with their body as sent."""
    settings, engine = request.app.state.settings, request.app.state.engine
    dead_letters.require_admin(engine, settings, principal, "GET /v1/notifications", session)
    rows, next_cursor = dead_letters.list_notifications(session, state, sink, cursor, limit)
    return NotificationPage(items=[_read(row) for row in rows], next_cursor=next_cursor)


@router.post(
    "/{notification_id}/retry",
    response_model=NotificationRead,
    summary="Re-queue a dead letter (admin)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def retry_notification(
    request: Request,
    notification_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    session: SessionDep,
    principal: CurrentPrincipal,
) -> NotificationRead:
    """The dead letter goes back to its sink, due now, with the same `webhook-id` and body; on record
    as `notification.requeued`."""
    settings, engine = request.app.state.settings, request.app.state.engine
    dead_letters.require_admin(engine, settings, principal, f"POST /v1/notifications/{notification_id}/retry", session)
    return _read(dead_letters.requeue(session, settings, principal, notification_id))


# The webhooks section of the OpenAPI document.
HEADERS = [
    {
        "name": "webhook-id",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "msg_17_3f9a0c2e41b7d6e58a90"},
        "description": "The same for every attempt of one event to one sink: deduplicate on it.",
    },
    {
        "name": "webhook-timestamp",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "1765000000"},
        "description": "Unix time of this attempt (refuse ones more than 5 minutes away).",
    },
    {
        "name": "webhook-signature",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "example": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="},
        "description": "`v1,<base64 HMAC-SHA256 of id.timestamp.body>` per configured secret, space-separated.",
    },
]


def document_webhooks(app: FastAPI) -> None:
    @app.webhooks.post(
        "tlsoverride-event",
        summary="An audit event, with the override as it was at that event",
        openapi_extra={"parameters": HEADERS},
        responses={
            "2XX": {"description": "Taken."},
            "4XX": {"description": "Refused: retried with backoff (no pause), then a dead letter."},
            "5XX": {"description": "Unavailable: retried, and the sink pauses for one backoff step."},
        },
    )
    def tlsoverride_event(body: WebhookEvent) -> None:
        """Sent to every `json` sink of `TLSO_NOTIFY_WEBHOOKS` for each event its `events` patterns match
        (default `override.*`, `recipient.*`, `audit.checkpoint`), signed as Standard Webhooks specify.
        Answer 2xx to take it. Any other answer is retried with backoff (the same `webhook-id` and body);
        5xx, 408, 429 and network errors also pause the sink for one backoff step. After
        `TLSO_NOTIFY_MAX_ATTEMPTS` the event is a dead letter (`GET /v1/notifications?state=failed`)."""
