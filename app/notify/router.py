"""`/v1/notifications`: the deliveries that failed (dead letters), for admins."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from app.core.auth import CurrentPrincipal
from app.core.db import SessionDep
from app.core.errors import problem_responses
from app.core.text import MAX_ID, Filter
from app.notify import dead_letters
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
