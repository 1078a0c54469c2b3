"""Outgoing notifications: Standard Webhooks (JSON) and Slack, at least once, fed from the audit trail.

The audit trail is the outbox: every event is written in the transaction of the change it records, in
order, and never changes. Each sink keeps a cursor (the last event it handled). A pass over a sink
leases its cursor (`notification_cursor`, compare-and-set), posts what is due without holding a
transaction, and records the outcome in a second short transaction — only while it still holds the
lease, so a crash or a lost lease re-sends (at least once; receivers dedupe on `webhook-id`).

One failing event never holds up the others: an event a sink does not take on the first attempt leaves
the line as a `notification` row (its body kept exactly as sent) and is retried on its own schedule;
after `TLSO_NOTIFY_MAX_ATTEMPTS` it is a dead letter an admin can re-queue. An answer that says the
receiver itself is unavailable (no connection, timeout, 5xx, 408, 429) pauses the whole sink for one
backoff step instead, so an outage costs one attempt per step, not one per event; a refusal (any other
4xx) pauses nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select
from standardwebhooks.webhooks import Webhook

from app import __version__
from app.audit.models import AuditEvent
from app.audit.service import record
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.notify import metrics
from app.notify import slack_web as web
from app.notify.events import WebhookEvent, build_event
from app.notify.models import Notification, NotificationCursor, NotificationState, SlackMessage
from app.notify.sinks import Sink, sinks_from
from app.notify.slack_blocks import notification_message
from app.overrides.models import Override, Vote

log = logging.getLogger("app.notify")

MAX_BATCH = 50
RETRY_BATCH = 20
N = NotificationState
# One state machine for a failed delivery; changed only through `move()` (compare-and-set).
TRANSITIONS: dict[NotificationState, frozenset[NotificationState]] = {
    N.retrying: frozenset({N.retrying, N.delivered, N.failed}),
    N.failed: frozenset({N.retrying}),
    N.delivered: frozenset(),
}


@dataclass
class Outgoing:
    """One event for one sink: its body is rendered once and never changes (retries send the same)."""

    seq: int
    webhook_id: str
    event_type: str
    override_id: int | None
    payload: dict[str, Any]
    at: datetime
    retry: Notification | None = None
    slack: SlackMessage | None = None  # the message that already shows this override (Slack channel sinks)


@dataclass
class Outcome:
    ok: bool
    unavailable: bool = False  # the receiver, not this event, is the problem: pause the sink
    status: int | None = None
    error: str | None = None
    posted: tuple[str, str] | None = None  # Slack: (channel, ts) of the message now showing the override


@dataclass
class _Claim:
    retries: list[Outgoing]
    fresh: list[tuple[int, Outgoing | None]]  # every event after the cursor; None: the sink does not want it
    sent: list[tuple[Outgoing, Outcome]] = field(default_factory=list)


def webhook_id(sink: str, seq: int, event_hash: str) -> str:
    """Stable per event and sink (a retry, a re-queue, a second worker: the same id), unique across sinks."""
    digest = hashlib.sha256(f"{sink}\n{event_hash}".encode()).hexdigest()[:20]
    return f"msg_{seq}_{digest}"


def body_of(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signature(secrets: Sequence[str], message_id: str, timestamp: datetime, body: str) -> str:
    """Standard Webhooks `webhook-signature`: `v1,<base64>` per secret, space-separated (rotation)."""
    return " ".join(Webhook(secret).sign(message_id, timestamp, body) for secret in secrets)


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: one retry interval after the first failure, doubling."""
    return float(min(settings.retry_max_seconds, settings.retry_initial_seconds * 2 ** min(attempts - 1, 16)))


# ---------------------------------------------------------------------------------------------------------------
# The pass


async def deliver(engine: Engine, settings: Settings, http: httpx.AsyncClient, owner: str) -> int:
    """One delivery pass over every sink; returns how many events were delivered."""
    delivered = 0
    for sink in sinks_from(settings):
        delivered += await _deliver_sink(engine, settings, http, sink, owner)
    return delivered


async def _deliver_sink(engine: Engine, settings: Settings, http: httpx.AsyncClient, sink: Sink, owner: str) -> int:
    lease = settings.worker_lease_seconds
    claim = _claim(engine, settings, sink, owner, timedelta(seconds=lease))
    if claim is None:
        return 0
    started = time.monotonic()
    stopped = False
    for outgoing in claim.retries + [o for _, o in claim.fresh if o is not None]:
        if time.monotonic() - started > lease / 2:  # leave time to record before the lease runs out
            break
        if outgoing.retry is not None and any(o.retry is not None and r.unavailable for o, r in claim.sent):
            continue  # one failing retry per pass is enough to learn the receiver still fails
        outcome = await send(http, settings, sink, outgoing)
        claim.sent.append((outgoing, outcome))
        if outcome.posted is not None:
            _shows(claim, outgoing, outcome.posted)
        metrics.ATTEMPTS.labels(sink.name, "delivered" if outcome.ok else "failed").inc()
        if outcome.unavailable and outgoing.retry is None:
            # The line itself is blocked: pause the sink. A retry that fails pauses nothing, so an event the
            # receiver always answers 5xx to holds up the ones after it by one retry interval at most.
            stopped = True
            break
    return _record(engine, settings, sink, owner, claim, stopped)


def _shows(claim: _Claim, outgoing: Outgoing, posted: tuple[str, str]) -> None:
    """The later events of the same override in this pass update the message just posted or updated."""
    shown = SlackMessage(
        sink="",
        override_id=outgoing.override_id or 0,
        channel=posted[0],
        ts=posted[1],
        last_seq=outgoing.seq,
        updated_at=outgoing.at,
    )
    for later in claim.retries + [o for _, o in claim.fresh if o is not None]:
        if later.override_id == outgoing.override_id and later.seq > outgoing.seq:
            later.slack = shown


def _claim(engine: Engine, settings: Settings, sink: Sink, owner: str, lease: timedelta) -> _Claim | None:
    """Lease the sink's cursor (short transaction); render the events due: retries first, then new ones."""
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
        session.refresh(cursor)
        retries = session.exec(
            select(Notification)
            .where(Notification.sink == sink.name, Notification.state == N.retrying)
            .where(or_(col(Notification.next_attempt_at).is_(None), col(Notification.next_attempt_at) <= now))
            .order_by(col(Notification.seq))
            .limit(RETRY_BATCH)
        ).all()
        events = session.exec(
            select(AuditEvent).where(AuditEvent.seq > cursor.last_seq).order_by(col(AuditEvent.seq)).limit(MAX_BATCH)
        ).all()
        renderer = _Renderer(session, settings, sink, events, [n.override_id for n in retries])
        return _Claim(
            retries=[renderer.retry(n) for n in retries],
            fresh=[(event.seq, renderer.fresh(event)) for event in events],
        )


class _Renderer:
    """Renders a batch of audit rows for one sink with a handful of queries (not a few per event)."""

    def __init__(
        self,
        session: Session,
        settings: Settings,
        sink: Sink,
        events: Sequence[AuditEvent],
        more_ids: Sequence[int | None],
    ) -> None:
        self.settings, self.sink = settings, sink
        ids = {e.override_id for e in events if e.override_id} | {i for i in more_ids if i}
        self.overrides = {o.id: o for o in session.exec(select(Override).where(col(Override.id).in_(ids))).all()}
        self.votes: dict[int, list[Vote]] = {}
        self.trail: dict[int, list[AuditEvent]] = {}
        self.messages: dict[int, SlackMessage] = {}
        if ids:
            for vote in session.exec(select(Vote).where(col(Vote.override_id).in_(ids))).all():
                self.votes.setdefault(vote.override_id, []).append(vote)
            for row in session.exec(select(AuditEvent).where(col(AuditEvent.override_id).in_(ids))).all():
                self.trail.setdefault(row.override_id or 0, []).append(row)
        if ids and sink.channel:
            query = select(SlackMessage).where(SlackMessage.sink == sink.name, col(SlackMessage.override_id).in_(ids))
            self.messages = {m.override_id: m for m in session.exec(query).all()}

    def fresh(self, row: AuditEvent) -> Outgoing | None:
        override = self.overrides.get(row.override_id) if row.override_id else None
        if not self.sink.wants(row.action, override.requested_via if override else None, override is not None):
            return None
        event = build_event(
            row,
            self.settings,
            override,
            self.votes.get(row.override_id or 0, []),
            self.trail.get(row.override_id or 0, []),
        )
        return Outgoing(
            seq=row.seq,
            webhook_id=webhook_id(self.sink.name, row.seq, row.hash),
            event_type=row.action,
            override_id=row.override_id,
            payload=render(self.sink, event, self.settings),
            at=row.at,
            slack=self.messages.get(row.override_id or 0),
        )

    def retry(self, notification: Notification) -> Outgoing:
        return Outgoing(
            seq=notification.seq,
            webhook_id=notification.webhook_id,
            event_type=notification.event_type,
            override_id=notification.override_id,
            payload=notification.payload,
            at=notification.created_at,
            retry=notification,
            slack=self.messages.get(notification.override_id or 0),
        )


def render(sink: Sink, event: WebhookEvent, settings: Settings) -> dict[str, Any]:
    if sink.format == "slack":
        return notification_message(event, settings)
    return event.model_dump(mode="json", by_alias=True)


def _last_seq(session: Session) -> int:
    last = session.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    return int(last or 0)


# ---------------------------------------------------------------------------------------------------------------
# Sending


async def send(http: httpx.AsyncClient, settings: Settings, sink: Sink, outgoing: Outgoing) -> Outcome:
    """Post one event to one sink; never raises for what the receiver or the network does."""
    try:
        if sink.channel:
            return await _send_slack_api(http, settings, sink, outgoing)
        return await _send_webhook(http, sink, outgoing)
    except httpx.HTTPError as exc:
        return Outcome(ok=False, unavailable=True, error=f"{type(exc).__name__}: {exc}"[:500])


async def _send_webhook(http: httpx.AsyncClient, sink: Sink, outgoing: Outgoing) -> Outcome:
    body = body_of(outgoing.payload)
    headers = {"Content-Type": "application/json", "User-Agent": f"tlsoverride/{__version__}"}
    if sink.secrets:
        now = datetime.now(UTC)
        headers |= {
            "webhook-id": outgoing.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature(sink.secrets, outgoing.webhook_id, now, body),
        }
    assert sink.url is not None
    response = await http.post(sink.url, content=body.encode(), headers=headers)
    return judge(response.status_code, response.text)


def judge(status: int, text: str = "") -> Outcome:
    """Sort a receiver's answer: taken, refused (this event), or unavailable (the receiver)."""
    if 200 <= status < 300:
        return Outcome(ok=True, status=status)
    unavailable = status >= 500 or status in (408, 429)
    return Outcome(ok=False, unavailable=unavailable, status=status, error=f"HTTP {status}: {text[:200]}".strip())


async def _send_slack_api(http: httpx.AsyncClient, settings: Settings, sink: Sink, outgoing: Outgoing) -> Outcome:
    """A Slack channel: the override's first event posts a message, the later ones update it in place."""
    assert sink.channel is not None
    message = outgoing.slack
    if message is not None and message.last_seq >= outgoing.seq:
        return Outcome(ok=True)  # the message already shows a later event (this one was retried late)
    if message is not None and outgoing.override_id is not None:
        answer = await web.call(
            http, settings, "chat.update", {**outgoing.payload, "channel": message.channel, "ts": message.ts}
        )
        if answer.ok or answer.error_code not in ("message_not_found", "cant_update_message"):
            return _slack_outcome(answer, (message.channel, message.ts))
    answer = await web.call(http, settings, "chat.postMessage", {**outgoing.payload, "channel": sink.channel})
    posted = (str(answer.body.get("channel") or sink.channel), str(answer.body.get("ts") or ""))
    return _slack_outcome(answer, posted if answer.ok and outgoing.override_id else None)


def _slack_outcome(answer: web.Answer, posted: tuple[str, str] | None) -> Outcome:
    if answer.ok:
        return Outcome(ok=True, status=answer.status, posted=posted)
    return Outcome(ok=False, unavailable=answer.unavailable, status=answer.status, error=answer.error)


# ---------------------------------------------------------------------------------------------------------------
# Recording


def _record(engine: Engine, settings: Settings, sink: Sink, owner: str, claim: _Claim, stopped: bool) -> int:
    """Move the cursor past what was handled and keep what failed; only while this worker holds the lease."""
    outcomes = {id(o): outcome for o, outcome in claim.sent}
    with transaction(engine) as session:
        cursor = session.exec(
            select(NotificationCursor)
            .where(NotificationCursor.sink == sink.name, NotificationCursor.lease_owner == owner)
            .with_for_update()
        ).first()
        if cursor is None:
            return 0  # the lease was taken over meanwhile; the other worker re-sends (at least once)
        now = utcnow()
        for outgoing, outcome in claim.sent:
            if outgoing.retry is not None:
                _after_retry(session, settings, sink, cursor, outgoing.retry, outcome, now)
        last_seq = cursor.last_seq
        for seq, wanted in claim.fresh:
            if wanted is not None:
                outcome_or_none = outcomes.get(id(wanted))
                if outcome_or_none is None:
                    break  # not sent (the pass stopped): it stays after the cursor
                if not outcome_or_none.ok:
                    _park(session, settings, sink, cursor, wanted, outcome_or_none, now)
            last_seq = seq
        cursor.last_seq = last_seq
        for outgoing, outcome in claim.sent:
            if outcome.posted and outgoing.override_id is not None:
                _remember_message(session, sink, outgoing, outcome.posted, now)
        delivered = sum(1 for _, outcome in claim.sent if outcome.ok)
        cursor.delivered += delivered
        if stopped:
            cursor.attempts += 1
            error = claim.sent[-1][1].error or "unavailable"
            cursor.next_attempt_at = now + timedelta(seconds=backoff(settings, cursor.attempts))
            cursor.last_error = error[:500]
            log.warning(
                "notification sink %s unavailable (%s): paused for %.1f s",
                sink.name,
                error,
                backoff(settings, cursor.attempts),
            )
        elif delivered:
            cursor.attempts, cursor.next_attempt_at, cursor.last_error = 0, None, None
        cursor.lease_owner, cursor.lease_until = None, None
        session.add(cursor)
    return delivered


def _park(
    session: Session,
    settings: Settings,
    sink: Sink,
    cursor: NotificationCursor,
    outgoing: Outgoing,
    outcome: Outcome,
    now: datetime,
) -> None:
    """A first attempt failed: the event leaves the line, to be retried on its own (or given up at once)."""
    notification = Notification(
        sink=sink.name,
        seq=outgoing.seq,
        webhook_id=outgoing.webhook_id,
        event_type=outgoing.event_type,
        override_id=outgoing.override_id,
        state=N.retrying,
        attempts=1,
        next_attempt_at=now + timedelta(seconds=backoff(settings, 1)),
        last_error=(outcome.error or "")[:500] or None,
        last_status=outcome.status,
        payload=outgoing.payload,
        created_at=now,
        updated_at=now,
    )
    session.add(notification)
    session.flush()
    metrics.FAILURES.labels(sink.name).inc()
    if settings.notify_max_attempts <= 1:
        _dead_letter(session, sink, cursor, notification, now)


def _after_retry(
    session: Session,
    settings: Settings,
    sink: Sink,
    cursor: NotificationCursor,
    notification: Notification,
    outcome: Outcome,
    now: datetime,
) -> None:
    claimed = notification
    found = session.get(Notification, claimed.id)
    if found is None or found.version != claimed.version:
        return  # changed since the claim (cannot happen under the lease; never overwrite it)
    notification = found
    if outcome.ok:
        move(session, notification, N.delivered, next_attempt_at=None, last_status=outcome.status, updated_at=now)
        return
    metrics.FAILURES.labels(sink.name).inc()
    attempts = notification.attempts + 1
    move(
        session,
        notification,
        N.retrying,
        attempts=attempts,
        next_attempt_at=now + timedelta(seconds=backoff(settings, attempts)),
        last_error=(outcome.error or "")[:500] or None,
        last_status=outcome.status,
        updated_at=now,
    )
    if attempts >= settings.notify_max_attempts:
        _dead_letter(session, sink, cursor, notification, now)


def _dead_letter(
    session: Session, sink: Sink, cursor: NotificationCursor, notification: Notification, now: datetime
) -> None:
    move(session, notification, N.failed, next_attempt_at=None, updated_at=now)
    cursor.dropped += 1
    metrics.DEAD_LETTERS.labels(sink.name).inc()
    log.error(
        "notification %s (event %s) to %s is a dead letter after %s attempts: %s",
        notification.id,
        notification.seq,
        sink.name,
        notification.attempts,
        notification.last_error,
    )
    record(
        session,
        actor="system",
        action="notification.dead_lettered",
        override_id=notification.override_id,
        after={"notification": notification.id, "sink": sink.name, "seq": notification.seq},
        comment=notification.last_error,
    )


def move(session: Session, notification: Notification, to: NotificationState, **values: Any) -> Notification:
    """Change a delivery's state if the table allows it and nobody changed it meanwhile (compare-and-set)."""
    from app.core.errors import Conflict, InvalidTransition

    if to not in TRANSITIONS[notification.state]:
        raise InvalidTransition(f"A notification in state '{notification.state}' cannot become '{to}'.")
    result = session.execute(
        update(Notification)
        .where(col(Notification.id) == notification.id)
        .where(col(Notification.state) == notification.state)
        .where(col(Notification.version) == notification.version)
        .values(state=to, version=notification.version + 1, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict("The notification was changed concurrently; reload it and try again.")
    session.expire(notification)
    session.refresh(notification)
    return notification


def _remember_message(session: Session, sink: Sink, outgoing: Outgoing, posted: tuple[str, str], now: datetime) -> None:
    message = session.get(SlackMessage, (sink.name, outgoing.override_id))
    if message is None:
        session.add(
            SlackMessage(
                sink=sink.name,
                override_id=outgoing.override_id or 0,
                channel=posted[0],
                ts=posted[1],
                last_seq=outgoing.seq,
                updated_at=now,
            )
        )
    elif message.last_seq < outgoing.seq:
        message.channel, message.ts, message.last_seq, message.updated_at = posted[0], posted[1], outgoing.seq, now
        session.add(message)
