"""Webhook notifications: audit order, signatures, at-least-once through receiver outages."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from sqlmodel import Session, select

from app.audit.models import AuditEvent
from app.audit.service import record, verify_chain
from app.core.db import transaction
from app.notify.models import NotificationCursor
from app.notify.service import EVENT_HEADER, SIGNATURE_HEADER, deliver
from tests.helpers import LiveServer, audit_keys, make_settings

SECRET = "webhook-secret-for-tests"


class Receiver:
    """A real HTTP receiver on loopback whose answers the test scripts."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.status = 200
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.status == 200:
                self.received.append({"body": json.loads(body), "headers": dict(request.headers), "raw": body})
            return Response(status_code=self.status)

        self.server = LiveServer(app)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with receiver.server:
        yield receiver


def _settings(receiver: Receiver, **sink: Any) -> Any:
    spec = {"url": f"{receiver.server.url}/hook", "secret": SECRET, **sink}
    return make_settings(notify_webhooks={"ops": spec}, retry_initial_seconds=0.0, notify_max_attempts=2)


def _events(engine: Any, *actions: str) -> None:
    with transaction(engine) as session:
        for action in actions:
            record(session, actor="alice", action=action, override_id=1, after={"state": "pending"}, comment="c")


async def test_new_sink_starts_at_the_end_then_delivers_in_order_signed(engine: Any, receiver: Receiver) -> None:
    settings = _settings(receiver)
    _events(engine, "override.created")
    async with httpx.AsyncClient() as http:
        assert await deliver(engine, settings, http, "w1") == 0  # creates the cursor after seq 1
        _events(engine, "override.approved", "vote.approve", "override.active")
        assert await deliver(engine, settings, http, "w1") == 2
    assert [r["body"]["event"] for r in receiver.received] == ["override.approved", "override.active"]
    first = receiver.received[0]
    timestamp, _, mac = first["headers"][SIGNATURE_HEADER.lower()].partition(",sha256=")
    expected = hmac.new(SECRET.encode(), timestamp.removeprefix("t=").encode() + b"." + first["raw"], hashlib.sha256)
    assert mac == expected.hexdigest()
    assert first["headers"][EVENT_HEADER.lower()].startswith("2:")
    with Session(engine) as session:
        cursor = session.get(NotificationCursor, "ops")
        assert cursor is not None and cursor.last_seq == 4 and cursor.delivered == 2


async def test_receiver_outage_loses_nothing(engine: Any, receiver: Receiver) -> None:
    settings = _settings(receiver)
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")
        _events(engine, "override.created", "override.approved")
        receiver.status = 503
        assert await deliver(engine, settings, http, "w1") == 0
        with Session(engine) as session:
            cursor = session.get(NotificationCursor, "ops")
            assert cursor is not None and cursor.last_seq == 0 and cursor.attempts == 1 and cursor.last_error
        receiver.status = 200
        assert await deliver(engine, settings, http, "w1") == 2
    assert [r["body"]["seq"] for r in receiver.received] == [1, 2]


async def test_unreachable_receiver_backs_off(engine: Any) -> None:
    settings = make_settings(notify_webhooks={"ops": {"url": "http://127.0.0.1:9/hook"}}, retry_initial_seconds=30)
    async with httpx.AsyncClient(timeout=2) as http:
        await deliver(engine, settings, http, "w1")
        _events(engine, "override.created")
        assert await deliver(engine, settings, http, "w1") == 0
        assert await deliver(engine, settings, http, "w1") == 0  # still backing off: no second attempt
    with Session(engine) as session:
        cursor = session.get(NotificationCursor, "ops")
        assert cursor is not None and cursor.attempts == 1 and cursor.last_seq == 0


async def test_refused_event_is_dropped_after_max_attempts_and_audited(engine: Any, receiver: Receiver) -> None:
    settings = _settings(receiver)
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")
        _events(engine, "override.created")
        receiver.status = 400
        assert await deliver(engine, settings, http, "w1") == 0  # attempt 1: kept
        assert await deliver(engine, settings, http, "w1") == 0  # attempt 2 = max: dropped
    with Session(engine) as session:
        dropped = session.exec(select(AuditEvent).where(AuditEvent.action == "notification.dropped")).all()
        assert len(dropped) == 1 and dropped[0].after == {"sink": "ops", "seq": 1}
        assert verify_chain(session, audit_keys()).valid


async def test_slack_format_and_event_filter(engine: Any, receiver: Receiver) -> None:
    settings = _settings(receiver, format="slack", events=["override.approved"])
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")
        _events(engine, "override.created", "override.approved")
        assert await deliver(engine, settings, http, "w1") == 1
    assert receiver.received[0]["body"] == {
        "text": "tlsoverride: *override.approved* override 1 by alice → `pending`\n> c"
    }


async def test_a_leased_sink_is_not_delivered_twice(engine: Any, receiver: Receiver) -> None:
    settings = _settings(receiver)
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")
        _events(engine, "override.created")
        with transaction(engine) as session:  # worker w1 holds the lease (e.g. mid-delivery)
            cursor = session.get(NotificationCursor, "ops")
            assert cursor is not None
            from app.core.db import utcnow

            cursor.lease_owner, cursor.lease_until = "w1", utcnow().replace(year=2999)
            session.add(cursor)
        assert await deliver(engine, settings, http, "w2") == 0
    assert receiver.received == []
