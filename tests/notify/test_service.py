"""Webhook notifications as a receiver sees them: Standard Webhooks verified with the `standardwebhooks`
library by a real HTTP server in this process, full snapshots, retries with the same id and body, dead
letters that hold up nobody, a sink scoped to one integration, and the metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.audit.service import record, verify_chain
from app.core.config import Settings
from app.core.db import transaction
from app.notify.models import Notification, NotificationCursor, NotificationState
from app.notify.service import deliver
from app.notify.sinks import SinkConfigError, sinks_from
from tests.helpers import COMMENT, LiveServer, assert_problem, audit_keys, audit_rows, make_settings

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
NEW_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BASE = "https://tlso.example.com"


@dataclass
class Attempt:
    status: int
    headers: dict[str, str]
    raw: bytes
    at: float

    @property
    def body(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.raw)
        return result

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """A real HTTP receiver on loopback; `answer` decides the status of each attempt."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.answer: Callable[[Attempt], int] = lambda attempt: 200
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            attempt = Attempt(0, dict(request.headers), await request.body(), time.monotonic())
            attempt.status = self.answer(attempt)
            self.attempts.append(attempt)
            return Response(status_code=attempt.status)

        self.server = LiveServer(app)

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    @property
    def received(self) -> list[dict[str, Any]]:
        """Taken deliveries, each once (deduplicated by webhook-id, as a receiver should)."""
        seen: dict[str, dict[str, Any]] = {}
        for attempt in self.attempts:
            if 200 <= attempt.status < 300 and attempt.id not in seen:
                seen[attempt.id] = {"body": attempt.body, "headers": attempt.headers, "raw": attempt.raw}
        return list(seen.values())

    def types(self) -> list[str]:
        return [r["body"]["type"] for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with receiver.server:
        yield receiver


def sink_settings(receiver: Receiver, **sink: Any) -> Settings:
    extra = {key: sink.pop(key) for key in list(sink) if key in Settings.model_fields}
    spec = {"url": receiver.url, "secret": SECRET, **sink}
    values: dict[str, Any] = {
        "notify_webhooks": {"ops": spec},
        "public_base_url": BASE,
        "retry_initial_seconds": 0.0,
        "notify_max_attempts": 3,
    }
    return make_settings(**(values | extra))


@pytest.fixture
def settings(receiver: Receiver) -> Settings:
    return sink_settings(receiver)


async def drain(engine: Engine, settings: Settings, until: Callable[[], bool], timeout: float = 20.0) -> None:
    """Delivery passes (as the worker makes them) until `until()` holds."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("not delivered in time")
            await deliver(engine, settings, http, "w1")
            await asyncio.sleep(0.02)


async def start(engine: Engine, settings: Settings) -> None:
    """A new sink starts at the end of the trail."""
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")


def create(client: TestClient, auth: Any, **fields: Any) -> dict[str, Any]:
    body = {
        "destination": "example.org",
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale after a certificate renewal.",
        "ticket": "MAIL-4711",
        "ticket_url": "https://tickets.example.com/MAIL-4711",
        "duration": "PT30M",
        **fields,
    }
    headers = fields.pop("headers", None) or auth("alice", "requester")
    body.pop("headers", None)
    response = client.post("/v1/overrides", json=body, headers=headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


# ---------------------------------------------------------------------------------------------------------------
# What a receiver gets


async def test_every_delivery_verifies_with_standardwebhooks_and_carries_the_override_as_it_was(
    engine: Engine, client: TestClient, auth: Any, settings: Settings, receiver: Receiver
) -> None:
    await start(engine, settings)
    override = create(client, auth)
    decided = client.post(f"/v1/overrides/{override['id']}/approve", json=COMMENT, headers=auth("bob", "approver"))
    assert decided.status_code == 200, decided.text
    await drain(engine, settings, lambda: "override.approved" in receiver.types())

    verifier = Webhook(SECRET)
    for delivery in receiver.received:
        assert verifier.verify(delivery["raw"], delivery["headers"]) == delivery["body"]  # the README's 3 lines
    assert "x-tlsoverride-signature" not in receiver.received[0]["headers"]  # the home-made signature is gone
    created, approved = (r["body"] for r in receiver.received)  # votes are `vote.*`: not in the default events
    assert [created["type"], approved["type"]] == ["override.created", "override.approved"]
    assert created["schema"] == "tlsoverride.event/v1"
    snapshot = created["data"]["override"]
    # Delivered after the approval, the creation still shows the override as it was then.
    assert (snapshot["state"], snapshot["approvals"], snapshot["version"]) == ("pending", [], 1)
    assert snapshot["duration"] == "PT30M" and "0:30:00" not in json.dumps(created)
    assert (snapshot["ticket"], snapshot["ticket_url"]) == ("MAIL-4711", "https://tickets.example.com/MAIL-4711")
    assert snapshot["justification"].startswith("Recipient TLSA records")
    assert snapshot["requested_by"] == {"id": "alice", "name": "Alice", "key": "alice"}
    assert snapshot["approvals_required"] == 1 and snapshot["requested_via"] is None
    assert snapshot["links"]["self"] == f"{BASE}/v1/overrides/{override['id']}"
    assert snapshot["links"]["approve"] == f"{BASE}/v1/overrides/{override['id']}/approve"
    assert snapshot["summary"]["line"] == "encrypt · not diagnosed · certificate not checked"
    after = approved["data"]["override"]
    assert after["state"] == "approved" and [a["reviewer"] for a in after["approvals"]] == ["bob"]
    assert (approved["data"]["actor"], approved["data"]["via"]) == ("bob", None)
    audit = audit_rows(engine, "override.approved")[0]
    with Session(engine) as session:
        row = session.exec(select(NotificationCursor)).one()
    assert approved["data"]["audit"]["seq"] == audit["seq"] and row.last_seq >= audit["seq"]
    ids = [r["headers"]["webhook-id"] for r in receiver.received]
    assert len(set(ids)) == 2 and all(
        i.startswith(f"msg_{r['body']['data']['audit']['seq']}_") for i, r in zip(ids, receiver.received, strict=True)
    )


async def test_every_secret_of_a_sink_signs_so_receivers_can_rotate(engine: Engine, receiver: Receiver) -> None:
    settings = sink_settings(receiver, secret=[SECRET, NEW_SECRET])
    await start(engine, settings)
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="c")
    await drain(engine, settings, lambda: len(receiver.received) == 1)
    delivery = receiver.received[0]
    assert len(delivery["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, NEW_SECRET):  # a receiver holding only the old or only the new secret
        Webhook(secret).verify(delivery["raw"], delivery["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(delivery["raw"], delivery["headers"])


def test_a_sink_without_a_standard_webhooks_secret_is_refused(tmp_path: Any) -> None:
    for spec, reason in [
        ({"url": "https://r.example/hook"}, "is required"),
        ({"url": "https://r.example/hook", "secret": "plain-secret"}, "whsec_"),
        ({"url": "https://r.example/hook", "secret": "whsec_" + base64.b64encode(b"short").decode()}, "24 to 64"),
        ({"url": "https://r.example/hook", "secret": SECRET, "colour": "red"}, "unknown key"),
        ({"format": "slack", "channel": "C1"}, "TLSO_SLACK_BOT_TOKEN"),
    ]:
        with pytest.raises(SinkConfigError, match=reason):
            sinks_from(make_settings(notify_webhooks={"ops": spec}))
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"{SECRET}\n{NEW_SECRET}\n")
    (sink,) = sinks_from(
        make_settings(notify_webhooks={"ops": {"url": "https://r/h", "secret_file": str(secret_file)}})
    )
    assert sink.secrets == (SECRET, NEW_SECRET)


def test_production_refuses_sinks_without_a_public_base_url() -> None:
    production = {"env": "production", "oidc_issuer": "https://idp.example.com", "oidc_audience": "tlso"}
    with pytest.raises(ValueError, match="TLSO_PUBLIC_BASE_URL"):
        Settings(**production, notify_webhooks={"ops": {"url": "https://r/h", "secret": SECRET}})
    with pytest.raises(ValueError, match="TLSO_PUBLIC_BASE_URL"):
        Settings(**production, slack_signing_secret="s")
    assert Settings(**production).public_base_url == ""
    given = Settings(**production, public_base_url="https://tlso.example.com/", notify_webhooks={})
    assert given.link("/v1/overrides/1") == "https://tlso.example.com/v1/overrides/1"


# ---------------------------------------------------------------------------------------------------------------
# Failures


async def test_a_receiver_that_fails_three_times_then_recovers_gets_every_event_exactly_as_sent(
    engine: Engine, receiver: Receiver
) -> None:
    settings = sink_settings(receiver, notify_max_attempts=10, retry_initial_seconds=0.05)
    await start(engine, settings)
    failures = iter([503, 503, 503])
    receiver.answer = lambda attempt: next(failures, 200)
    with transaction(engine) as session:
        for n in range(4):
            record(session, actor="alice", action="override.created", comment=f"event {n}")
    await drain(engine, settings, lambda: len(receiver.received) == 4)
    assert [a.status for a in receiver.attempts[:3]] == [503, 503, 503]
    # Every event, once each after deduplication (a retried one may come after later ones: `audit.seq` orders).
    assert sorted(r["body"]["data"]["comment"] for r in receiver.received) == [f"event {n}" for n in range(4)]
    by_id: dict[str, set[bytes]] = {}
    for attempt in receiver.attempts:
        by_id.setdefault(attempt.id, set()).add(attempt.raw)
        Webhook(SECRET).verify(attempt.raw, attempt.headers)
    assert all(len(bodies) == 1 for bodies in by_id.values())  # every retry: the same id, the same body
    with Session(engine) as session:
        retried = session.exec(select(Notification)).all()
        assert retried and {n.state for n in retried} == {NotificationState.delivered}
        cursor = session.get(NotificationCursor, "ops")
        assert cursor is not None and cursor.attempts == 0 and cursor.dropped == 0


@pytest.mark.parametrize("poison", [400, 500])
async def test_a_poisoned_event_delays_the_next_ones_by_at_most_one_retry_interval(
    engine: Engine, client: TestClient, auth: Any, receiver: Receiver, poison: int
) -> None:
    interval = 1.5
    settings = sink_settings(receiver, notify_max_attempts=3, retry_initial_seconds=interval)
    await start(engine, settings)
    receiver.answer = lambda attempt: poison if attempt.body["data"]["comment"] == "poison" else 200
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="poison")
        record(session, actor="alice", action="override.created", comment="next")
    await drain(engine, settings, lambda: len(receiver.received) == 1)
    first_try = receiver.attempts[0]
    assert first_try.body["data"]["comment"] == "poison"
    delay = next(a.at for a in receiver.attempts if a.body["data"]["comment"] == "next") - first_try.at
    # Measured, not a speed claim: the bound is one retry interval plus generous slack for a loaded machine.
    assert delay < interval + 1.0, delay
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="later")
    await drain(engine, settings, lambda: len(receiver.received) == 2, timeout=30)

    # After its attempts the poisoned event is a dead letter, listed for admins, never with a secret.
    await drain(engine, settings, lambda: _states(engine) == [NotificationState.failed], timeout=30)
    assert sum(1 for a in receiver.attempts if a.body["data"]["comment"] == "poison") == 3
    listed = client.get("/v1/notifications?state=failed", headers=auth("root", "admin"))
    assert listed.status_code == 200, listed.text
    (item,) = listed.json()["items"]
    assert (item["sink"], item["attempts"], item["last_status"]) == ("ops", 3, poison)
    assert item["payload"] == first_try.body and item["webhook_id"] == first_try.id
    assert SECRET not in listed.text and SECRET.removeprefix("whsec_") not in listed.text
    assert len(audit_rows(engine, "notification.dead_lettered")) == 1

    # Re-queued by an admin (on record), it goes out again with the same id and body, and is taken.
    receiver.answer = lambda attempt: 200
    retried = client.post(f"/v1/notifications/{item['id']}/retry", headers=auth("root", "admin"))
    assert retried.status_code == 200 and retried.json()["state"] == "retrying", retried.text
    assert_problem(client.post(f"/v1/notifications/{item['id']}/retry", headers=auth("root", "admin")), 409)
    await drain(engine, settings, lambda: _states(engine) == [NotificationState.delivered])
    last = receiver.attempts[-1]
    assert (last.id, last.raw, last.status) == (first_try.id, first_try.raw, 200)
    assert [r["actor"] for r in audit_rows(engine, "notification.requeued")] == ["root"]
    with Session(engine) as session:
        assert verify_chain(session, audit_keys()).valid


def _states(engine: Engine) -> list[NotificationState]:
    with Session(engine) as session:
        return [n.state for n in session.exec(select(Notification)).all()]


async def test_an_unreachable_receiver_pauses_the_sink_instead_of_trying_every_event(engine: Engine) -> None:
    settings = make_settings(
        notify_webhooks={"ops": {"url": "http://127.0.0.1:9/hook", "secret": SECRET}}, retry_initial_seconds=30
    )
    await start(engine, settings)
    with transaction(engine) as session:
        for n in range(3):
            record(session, actor="alice", action="override.created", comment=f"event {n}")
    async with httpx.AsyncClient(timeout=2) as http:
        assert await deliver(engine, settings, http, "w1") == 0
        assert await deliver(engine, settings, http, "w1") == 0  # paused: no second attempt
    with Session(engine) as session:
        cursor = session.get(NotificationCursor, "ops")
        assert cursor is not None and cursor.attempts == 1 and cursor.last_seq == 1  # one event tried, two wait
        assert [n.seq for n in session.exec(select(Notification)).all()] == [1]


def test_only_admins_see_notifications_and_refusals_are_on_record(
    client: TestClient, auth: Any, engine: Engine
) -> None:
    for caller in (auth("bob", "approver"), auth("ann", "auditor")):
        assert_problem(client.get("/v1/notifications", headers=caller), 403)
    assert_problem(client.post("/v1/notifications/1/retry", headers=auth("bob", "approver")), 403)
    assert_problem(client.post("/v1/notifications/1/retry", headers=auth("root", "admin")), 404)
    assert len(audit_rows(engine, "auth.refused")) == 3


async def test_a_leased_sink_is_not_delivered_twice(engine: Engine, settings: Settings, receiver: Receiver) -> None:
    await start(engine, settings)
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="c")
    with transaction(engine) as session:  # worker w1 holds the lease (e.g. mid-delivery)
        cursor = session.get(NotificationCursor, "ops")
        assert cursor is not None
        from app.core.db import utcnow

        cursor.lease_owner, cursor.lease_until = "w1", utcnow().replace(year=2999)
        session.add(cursor)
    async with httpx.AsyncClient() as http:
        assert await deliver(engine, settings, http, "w2") == 0
    assert receiver.attempts == []


# ---------------------------------------------------------------------------------------------------------------
# A sink for one integration; metrics


async def test_a_sink_scoped_to_an_integration_gets_only_its_overrides(
    engine: Engine, app: Any, auth: Any, receiver: Receiver
) -> None:
    settings = sink_settings(receiver, requested_via="ticketing-client")
    app.state.settings = settings
    with TestClient(app) as client:
        await start(engine, settings)
        ticketing = auth("ticketing-client", "integration", client_id="ticketing-client", on_behalf_of="carol")
        theirs = create(client, auth, headers=ticketing, destination="tickets.example")
        create(client, auth, destination="other.example")  # alice, directly
        with transaction(engine) as session:
            record(session, actor="system", action="override.created", comment="no override")
        await drain(engine, settings, lambda: len(receiver.received) >= 1)
        await asyncio.sleep(0.1)
        await drain(engine, settings, lambda: True)
    (only,) = receiver.received
    assert only["body"]["data"]["override"]["id"] == theirs["id"]
    assert only["body"]["data"]["override"]["requested_via"] == "ticketing-client"
    assert only["body"]["data"]["via"] == "ticketing-client"


async def test_sink_lag_failures_and_dead_letters_are_metrics(
    engine: Engine, client: TestClient, auth: Any, settings: Settings, receiver: Receiver
) -> None:
    await start(engine, settings)
    receiver.answer = lambda attempt: 400
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="refused")
    await drain(engine, settings, lambda: _states(engine) == [NotificationState.failed])
    text = client.get("/metrics", headers=auth("prometheus", "auditor")).text
    assert 'tlso_notifications{sink="ops",state="failed"} 1.0' in text
    assert 'tlso_notification_lag_seconds{sink="ops"}' in text
    assert 'tlso_notification_dead_letters_total{sink="ops"}' in text
    assert 'tlso_notification_failures_total{sink="ops"}' in text
    receiver.answer = lambda attempt: 503
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="stuck")
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")  # parks it; the sink pauses
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="waiting")
    time.sleep(1.1)
    text = client.get("/metrics", headers=auth("prometheus", "auditor")).text
    lag = next(line for line in text.splitlines() if line.startswith('tlso_notification_lag_seconds{sink="ops"}'))
    assert float(lag.split()[-1]) >= 1.0
