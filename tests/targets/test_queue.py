"""Mail queue evidence through the real API, with the stand-in's queue over real HTTP: on a new request,
in `GET /v1/targets/{name}/queue`, in the worker's refresh, in webhook events and Slack messages — and
never an address anywhere (issue 12 item 1)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.applications import Starlette

from app.core.config import Settings
from app.notify.events import WebhookEvent
from app.notify.slack_blocks import notification_message
from app.overrides.models import Override
from app.targets.queue import watched
from app.worker.loop import Worker
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import COMMENT, assert_problem, load
from tests.notify.test_service import BASE, SECRET, Receiver
from tests.standin import served
from tests.worker.helpers import BOB, approved, worker_settings

Auth = Callable[..., dict[str, str]]
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])
NOT_VERIFIED = "Server certificate not verified"
REQUEST = {
    "destination": "example.org",
    "policy": "encrypt",
    "justification": "Recipient TLSA records are stale after a certificate renewal.",
    "duration": "P3D",
}
# what the stand-in's addresses are made of: none of it may leave the queue module
SECRETS = ("alice.sender", "origin.example", "rcpt0", "rcpt1", "rcpt8", "stuck-person")


@pytest.fixture
def standin_url(standin_app: Starlette) -> Iterator[str]:
    with served(standin_app) as url:
        yield url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with receiver.server:
        yield receiver


@pytest.fixture
def settings(standin_url: str, receiver: Receiver) -> Settings:
    return worker_settings(
        mailcow_url=standin_url,
        queue_evidence_budget_seconds=10.0,
        queue_refresh_seconds=600.0,
        notify_webhooks={"ops": {"url": receiver.url, "secret": SECRET}},
        public_base_url=BASE,
    )


@pytest.fixture
async def worker(engine: Engine, settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(engine, settings, owner="w1")  # over real HTTP, like production
    yield worker
    await worker.aclose()


def stuck(standin: MailcowStandin) -> None:
    """14 messages to 9 recipients at example.org for 3 h; other mail for another domain."""
    three_hours = datetime.now(UTC) - timedelta(hours=3, minutes=1)
    standin.queue.fill("example.org", 14, 1, NOT_VERIFIED, three_hours, distinct_recipients=9)
    standin.queue.fill("other.example", 2, 2, "TLSA lookup error for mx.other.example:25", local_part="stuck-person")


def create(client: TestClient, auth: Auth, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/overrides", json={**REQUEST, **fields}, headers=auth("alice", "requester"))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_no_address(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert leaked == [], f"{leaked} leaked"


async def test_a_request_carries_what_is_stuck_for_its_destination(
    client: TestClient, auth: Auth, standin: MailcowStandin
) -> None:
    stuck(standin)
    created = create(client, auth)
    queue = created["queue"]
    assert (queue["destination"], queue["attributable"], queue["messages"], queue["recipients"]) == (
        "example.org",
        True,
        14,
        9,
    )
    assert queue["reasons"] == [
        {"reason": NOT_VERIFIED, "recipients": 9, "failure_class": "A", "label": "TLSA mismatch", "tls": True}
    ]
    assert queue["line"] == "14 messages to 9 recipients stuck for 3 h: Server certificate not verified"
    assert created["summary"]["stuck_mail"] == queue["line"]  # what a reviewer reads first
    assert queue["error"] is None and queue["capped"] is False
    assert datetime.fromisoformat(queue["oldest_arrival"]) < datetime.now(UTC) - timedelta(hours=3)
    read = client.get(f"/v1/overrides/{created['id']}", headers=auth("alice", "requester"))
    assert read.json()["queue"] == queue
    assert_no_address(read.text)
    listed = client.get("/v1/overrides", headers=auth(*BOB)).json()["items"]
    assert listed[0]["summary"]["stuck_mail"] == queue["line"] and "queue" not in listed[0]  # the compact view
    full = client.get("/v1/overrides?view=full", headers=auth(*BOB)).json()["items"]
    assert full[0]["queue"] == queue
    # reading the queue changed nothing in it
    assert len(standin.queue.deferred("example.org")) == 14


async def test_no_address_in_api_logs_webhooks_or_slack(
    client: TestClient,
    auth: Auth,
    standin: MailcowStandin,
    worker: Worker,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stuck(standin)
    await worker.tick()  # the sink starts at the end of the trail
    created = create(client, auth)
    approve = client.post(f"/v1/overrides/{created['id']}/approve", json=COMMENT, headers=auth(*BOB)).json()
    assert approve["state"] == "approved"
    per_domain = client.get("/v1/targets/default/queue", headers=auth(*BOB))
    await worker.tick()  # applies it and delivers the events
    await worker.tick()
    events = [r["body"] for r in receiver.received]
    assert events[0]["type"] == "override.created"
    line = "14 messages to 9 recipients stuck for 3 h: Server certificate not verified"
    assert events[0]["data"]["override"]["queue"]["line"] == line
    assert events[0]["data"]["override"]["queue"]["reasons"][0]["failure_class"] == "A"
    slack = notification_message(WebhookEvent.model_validate(events[0]), worker.settings)
    assert line in json.dumps(slack["blocks"])
    for text in (
        json.dumps(created),
        json.dumps(approve),
        per_domain.text,
        caplog.text,
        json.dumps(slack),
        *(r["raw"].decode() for r in receiver.received),
    ):
        assert_no_address(text)


@SQLITE_ONLY
def test_the_queue_endpoint_per_destination_and_roles(client: TestClient, auth: Auth, standin: MailcowStandin) -> None:
    stuck(standin)
    url = "/v1/targets/default/queue"
    assert_problem(client.get(url), 401)
    assert_problem(client.get(url, headers=auth("alice", "requester")), 403)
    assert_problem(client.get(url, headers=auth("audrey", "auditor")), 403)
    assert_problem(client.get("/v1/targets/nowhere/queue", headers=auth(*BOB)), 404)
    assert_problem(client.get(url, params={"destination": "not a domain"}, headers=auth(*BOB)), 422)
    calls_before = len(standin.calls)
    assert client.get(url, headers=auth("root", "admin")).status_code == 200
    everything = client.get(url, headers=auth(*BOB)).json()
    assert (everything["queued"], everything["deferred"], everything["capped"]) == (16, 16, False)
    assert [(d["destination"], d["messages"], d["recipients"]) for d in everything["destinations"]] == [
        ("example.org", 14, 9),
        ("other.example", 2, 4),
    ]
    assert everything["destinations"][1]["reasons"][0]["failure_class"] == "E"
    one = client.get(url, params={"destination": "Example.ORG."}, headers=auth(*BOB)).json()
    assert [d["line"] for d in one["destinations"]] == [
        "14 messages to 9 recipients stuck for 3 h: Server certificate not verified"
    ]
    hop = client.get(url, params={"destination": "[mx.example.org]:25"}, headers=auth(*BOB)).json()
    assert hop["destinations"][0]["attributable"] is False and hop["destinations"][0]["line"] is None
    assert "next hop" in hop["destinations"][0]["note"]
    assert {c["op"] for c in standin.calls[calls_before:]} == {"mailq"}  # reads only


@SQLITE_ONLY
def test_a_queue_that_cannot_be_read_never_blocks_a_request(
    client: TestClient, auth: Auth, standin: MailcowStandin
) -> None:
    stuck(standin)
    standin.queue.dockerapi = "down"
    created = create(client, auth)
    assert created["state"] == "pending"
    assert created["queue"]["error"].startswith("mailcow's mail queue could not be read (unavailable")
    assert created["queue"]["line"] is None and created["queue"]["messages"] == 0
    assert "<html" not in created["queue"]["error"]
    assert_problem(client.get("/v1/targets/default/queue", headers=auth(*BOB)), 503)


@SQLITE_ONLY
def test_a_refused_key_pauses_the_target_and_the_next_request_does_not_call(
    client: TestClient, auth: Auth, standin: MailcowStandin, app: FastAPI, settings: Settings
) -> None:
    app.state.settings = settings.model_copy(update={"mailcow_api_key": SecretStr("WRONG0-000000-000000-000000-0000")})
    first = create(client, auth)
    second = create(client, auth, destination="example.net")
    assert "auth" in first["queue"]["error"]
    assert "paused" in second["queue"]["error"]
    assert [call["status"] for call in standin.calls] == [401]  # one failed login, then no more calls
    assert_problem(client.get("/v1/targets/default/queue", headers=auth(*BOB)), 503)
    assert [call["status"] for call in standin.calls] == [401]


@SQLITE_ONLY
async def test_a_request_taken_without_the_queue_gets_it_from_the_next_worker_pass(
    client: TestClient, auth: Auth, standin: MailcowStandin, app: FastAPI, settings: Settings, worker: Worker
) -> None:
    # the read on create turned off (as for a request from Slack, whose 3 s the diagnosis takes)
    app.state.settings = settings.model_copy(update={"queue_evidence_budget_seconds": 0.0})
    stuck(standin)
    created = create(client, auth)
    assert created["queue"] is None
    assert standin.calls == []
    await worker.tick()
    queue = client.get(f"/v1/overrides/{created['id']}", headers=auth(*BOB)).json()["queue"]
    assert queue["line"] == "14 messages to 9 recipients stuck for 3 h: Server certificate not verified"


async def test_the_worker_refreshes_watched_overrides_without_a_new_version(
    client: TestClient, auth: Auth, standin: MailcowStandin, engine: Engine, worker: Worker
) -> None:
    stuck(standin)
    pending = create(client, auth)
    ended = create(client, auth, destination="other.example")
    assert (
        client.post(f"/v1/overrides/{ended['id']}/cancel", json=COMMENT, headers=auth("alice", "requester"))
    ).status_code == 200
    await worker.tick()
    assert [c for c in standin.calls if c["op"] == "mailq"][2:] == []  # both fresh: no read
    standin.queue.fill("example.org", 3, 1, "TLSA lookup error for mx.example.org:25", local_part="late")
    standin.queue.fill("other.example", 1)
    with Session(engine) as session:  # as if the interval had passed for both
        for row_id in (pending["id"], ended["id"]):
            row = session.get(Override, row_id)
            assert row is not None and row.queue is not None
            row.queue = {**row.queue, "checked_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
            session.add(row)
        session.commit()
    await worker.tick()
    refreshed = client.get(f"/v1/overrides/{pending['id']}", headers=auth(*BOB)).json()
    assert (refreshed["queue"]["messages"], refreshed["queue"]["recipients"]) == (17, 12)
    assert [r["failure_class"] for r in refreshed["queue"]["reasons"]] == ["A", "E"]
    assert refreshed["version"] == pending["version"]  # no reviewer's If-Match fails because of it
    gone = client.get(f"/v1/overrides/{ended['id']}", headers=auth(*BOB)).json()
    assert gone["queue"]["messages"] == 2  # ended overrides are not watched any more
    assert len([c for c in standin.calls if c["op"] == "mailq"]) == 3
    await worker.tick()
    assert len([c for c in standin.calls if c["op"] == "mailq"]) == 3  # fresh again


async def test_a_failed_refresh_is_recorded_and_not_retried_at_once(
    client: TestClient, auth: Auth, standin: MailcowStandin, engine: Engine, worker: Worker, settings: Settings
) -> None:
    worker.settings = worker.ctx.settings = settings.model_copy(update={"queue_refresh_seconds": 0.001})
    stuck(standin)
    created = create(client, auth)
    standin.queue.dockerapi = "down"
    await worker.tick()
    failed = client.get(f"/v1/overrides/{created['id']}", headers=auth(*BOB)).json()["queue"]
    assert failed["error"].startswith("mailcow's mail queue could not be read") and failed["messages"] == 0
    standin.queue.dockerapi = "up"
    await worker.tick()
    assert client.get(f"/v1/overrides/{created['id']}", headers=auth(*BOB)).json()["queue"]["messages"] == 14


async def test_an_active_override_s_evidence_comes_from_its_still_stuck_check_not_the_refresh(
    client: TestClient, auth: Auth, standin: MailcowStandin, engine: Engine, worker: Worker
) -> None:
    """The refresh leaves an active override whose queue pass is scheduled to that pass: its check writes the
    evidence and the `still_stuck` flag from one read, so that they never disagree. A next hop, which has no
    queue pass (its queue is not attributable), is refreshed as before."""
    released = approved(client, auth, "example.org")
    next_hop = approved(client, auth, "[mx.example.org]:25")
    await worker.tick()  # both active; the first's release done, its check scheduled
    assert load(engine, released).queue_due_at is not None and load(engine, next_hop).queue_due_at is None
    stale = [override_id for override_id, _ in watched(engine, "default", datetime.now(UTC) + timedelta(days=1))]
    assert stale == [next_hop]
