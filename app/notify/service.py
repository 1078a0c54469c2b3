"""Outgoing notifications: webhooks (JSON or Slack), signed, at least once, in audit order.

The audit trail is the outbox: every event is already written in the transaction of the change it
records, in order, and never changes. Each sink keeps a cursor (the last delivered `seq`); a worker
locks the cursor row (`FOR UPDATE SKIP LOCKED`), posts the next events and only then moves the
cursor. A crash re-sends (at least once; receivers dedupe on `X-Tlsoverride-Event`), never loses.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.audit.service import as_dict, record
from app.core.config import Settings, read_secret
from app.core.db import transaction, utcnow
from app.notify.models import NotificationCursor

log = logging.getLogger("app.notify")

SIGNATURE_HEADER = "X-Tlsoverride-Signature"
EVENT_HEADER = "X-Tlsoverride-Event"
# Signed checkpoints of the trail go to every sink that keeps the default: each receiver holds a copy
# of the anchor that someone who rewrites the database cannot reach.
DEFAULT_EVENTS = ["override.*", "recipient.*", "audit.checkpoint"]
MAX_BATCH = 50


@dataclass(frozen=True)
class Sink:
    name: str
    url: str
    secret: str | None
    format: str  # json | slack
    events: list[str]

    def wants(self, action: str) -> bool:
        return any(fnmatch.fnmatchcase(action, pattern) for pattern in self.events)


def sinks_from(settings: Settings) -> list[Sink]:
    sinks = []
    for name, spec in settings.notify_webhooks.items():
        secret_file = spec.get("secret_file")
        secret = read_secret(None, Path(secret_file)) if secret_file else spec.get("secret")
        events = spec.get("events") or DEFAULT_EVENTS
        sinks.append(
            Sink(
                name=name,
                url=str(spec["url"]),
                secret=secret,
                format=str(spec.get("format", "json")),
                events=[events] if isinstance(events, str) else list(events),
            )
        )
    return sinks


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`t=<unix>,sha256=<hex HMAC of "t.body">`: receivers recompute it and reject stale timestamps."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},sha256={mac}"


def render(sink: Sink, event: dict[str, Any]) -> dict[str, Any]:
    if sink.format == "slack" and event["action"] == "audit.checkpoint":
        signed = json.dumps(event["after"], sort_keys=True)
        return {"text": f"tlsoverride: signed audit checkpoint of seq {event['after']['seq']}\n```{signed}```"}
    if sink.format == "slack":
        override = f" override {event['override_id']}" if event.get("override_id") else ""
        state = (event.get("after") or {}).get("state")
        text = f"tlsoverride: *{event['action']}*{override} by {event['actor']}"
        if state:
            text += f" → `{state}`"
        if event.get("comment"):
            text += f"\n> {event['comment']}"
        return {"text": text}
    return {"event": event["action"], "seq": event["seq"], "data": event}


class _Permanent(Exception):
    """The receiver refused the event (4xx): retrying will not help."""


async def _post(http: httpx.AsyncClient, sink: Sink, event: dict[str, Any]) -> None:
    body = json.dumps(render(sink, event), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", EVENT_HEADER: f"{event['seq']}:{event['hash'][:16]}"}
    if sink.secret:
        headers[SIGNATURE_HEADER] = sign(sink.secret, str(int(time.time())), body)
    response = await http.post(sink.url, content=body, headers=headers)
    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
        raise _Permanent(f"HTTP {response.status_code}")
    response.raise_for_status()


def _claim(engine: Engine, sink: Sink, owner: str, lease: timedelta) -> tuple[int, list[dict[str, Any]]] | None:
    """Lease the sink's cursor (short transaction) and read the events after it."""
    with transaction(engine) as session:
        cursor = session.get(NotificationCursor, sink.name)
        if cursor is None:
            # A new sink starts at the end of the trail: it hears about what happens from now on.
            session.add(NotificationCursor(sink=sink.name, last_seq=_last_seq(session)))
            return None
        now = utcnow()
        claimed = session.execute(
            update(NotificationCursor)
            .where(col(NotificationCursor.sink) == sink.name)
            .where(or_(col(NotificationCursor.lease_until).is_(None), col(NotificationCursor.lease_until) < now))
            .where(
                or_(col(NotificationCursor.next_attempt_at).is_(None), col(NotificationCursor.next_attempt_at) <= now)
            )
            .values(lease_owner=owner, lease_until=now + lease)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        events = session.exec(
            select(AuditEvent).where(AuditEvent.seq > cursor.last_seq).order_by(col(AuditEvent.seq)).limit(MAX_BATCH)
        ).all()
        return cursor.attempts, [as_dict(e) for e in events]


def _last_seq(session: Session) -> int:
    last = session.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    return int(last or 0)


async def deliver(engine: Engine, settings: Settings, http: httpx.AsyncClient, owner: str) -> int:
    """One delivery pass over every sink; returns how many events were delivered."""
    delivered = 0
    for sink in sinks_from(settings):
        delivered += await _deliver_sink(engine, settings, http, sink, owner)
    return delivered


async def _deliver_sink(engine: Engine, settings: Settings, http: httpx.AsyncClient, sink: Sink, owner: str) -> int:
    # No transaction is open while posting: the cursor is leased, the HTTP calls happen, then the cursor
    # moves in a second short transaction (only if this worker still holds the lease).
    claim = _claim(engine, sink, owner, timedelta(seconds=settings.worker_lease_seconds))
    if claim is None:
        return 0
    attempts, events = claim
    last_seq, sent, dropped, error = None, 0, [], None
    for event in events:
        if sink.wants(event["action"]):
            try:
                await _post(http, sink, event)
            except _Permanent as exc:
                if attempts + 1 < settings.notify_max_attempts:
                    error = str(exc)
                    break
                log.error(
                    "notification %s to %s dropped after %s attempts: %s", event["seq"], sink.name, attempts + 1, exc
                )
                dropped.append((event, str(exc)))
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            else:
                sent += 1
            attempts = 0
        last_seq = event["seq"]
    with transaction(engine) as session:
        cursor = session.exec(
            select(NotificationCursor)
            .where(NotificationCursor.sink == sink.name, NotificationCursor.lease_owner == owner)
            .with_for_update()
        ).first()
        if cursor is None:
            return sent  # the lease was taken over meanwhile; the other worker re-sends (at least once)
        if last_seq is not None:
            cursor.last_seq, cursor.attempts, cursor.next_attempt_at, cursor.last_error = last_seq, 0, None, None
        if error is not None:
            _back_off(cursor, settings, error)
        cursor.delivered += sent
        cursor.dropped += len(dropped)
        cursor.lease_owner, cursor.lease_until = None, None
        session.add(cursor)
        for event, reason in dropped:
            record(
                session,
                actor="system",
                action="notification.dropped",
                override_id=event["override_id"],
                after={"sink": sink.name, "seq": event["seq"]},
                comment=reason,
            )
    return sent


def _back_off(cursor: NotificationCursor, settings: Settings, error: str) -> None:
    cursor.attempts += 1
    delay = min(settings.retry_max_seconds, settings.retry_initial_seconds * 2 ** min(cursor.attempts, 16))
    cursor.next_attempt_at = utcnow() + timedelta(seconds=delay)
    cursor.last_error = error[:500]
    log.warning("notification sink %s: %s (attempt %s, next in %.0f s)", cursor.sink, error, cursor.attempts, delay)
