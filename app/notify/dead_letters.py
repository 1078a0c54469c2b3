"""Deliveries that failed: listed for admins, and re-queued one at a time (on record)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from app.audit.refusals import record_refusal
from app.audit.service import record
from app.core.auth import Principal
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict, Forbidden, InvalidTransition, NotFound
from app.core.text import decode_cursor, encode_cursor
from app.notify.models import Notification, NotificationState
from app.notify.service import move
from app.notify.sinks import sinks_from


def require_admin(engine: Engine, settings: Settings, principal: Principal, attempted: str, session: Session) -> None:
    if principal.has("admin"):
        return
    session.rollback()  # on SQLite it holds the write lock the refusal's own transaction needs
    reason = principal.lacks("admin", to="manage notifications")
    record_refusal(
        engine,
        settings,
        actor=principal.actor,
        via=principal.via,
        override_id=None,
        after={"attempted": attempted, "roles": sorted(principal.roles)},
        comment=reason,
    )
    raise Forbidden(reason)


def list_notifications(
    session: Session,
    states: Sequence[NotificationState] | None,
    sink: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Notification], str | None]:
    """Newest first (keyset pagination on the id)."""
    query = select(Notification)
    if states:
        query = query.where(col(Notification.state).in_(list(states)))
    if sink:
        query = query.where(Notification.sink == sink)
    after = decode_cursor("n", cursor)
    if after is not None:
        query = query.where(col(Notification.id) < after)
    rows = list(session.exec(query.order_by(col(Notification.id).desc()).limit(limit + 1)).all())
    next_cursor = encode_cursor("n", rows[limit - 1].id or 0) if len(rows) > limit else None
    return rows[:limit], next_cursor


def requeue(session: Session, settings: Settings, principal: Principal, notification_id: int) -> Notification:
    """A dead letter goes back to its sink's retry list, due now, with its attempts counted afresh."""
    notification = session.exec(
        select(Notification).where(Notification.id == notification_id).with_for_update()
    ).first()
    if notification is None:
        raise NotFound(f"Notification {notification_id} does not exist.")
    if notification.state != NotificationState.failed:
        raise InvalidTransition(
            f"Only a dead letter (state failed) can be re-queued; this one is {notification.state}."
        )
    if notification.sink not in {sink.name for sink in sinks_from(settings)}:
        raise Conflict(f"Sink {notification.sink!r} is no longer configured (TLSO_NOTIFY_WEBHOOKS).")
    now = utcnow()
    move(session, notification, NotificationState.retrying, attempts=0, next_attempt_at=now, updated_at=now)
    record(
        session,
        actor=principal.actor,
        via=principal.via,
        action="notification.requeued",
        override_id=notification.override_id,
        after={"notification": notification.id, "sink": notification.sink, "seq": notification.seq},
    )
    return notification
