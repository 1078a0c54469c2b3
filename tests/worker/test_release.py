"""The queue pass (app/worker/release.py), stepped one tick at a time against the stand-in's mail queue:
an active override's deferred mail is delivered in the pass that applied it (by queue id, in batches,
other destinations untouched), checked afterwards (a useless override is flagged `still_stuck`), and its
destination watched after the end (`recipient.still_failing`, `recipient.regressed`). Two workers
release once. The stand-in fails every test that sends `flush`, `super_delete` or `delete/mailq`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.diagnosis.models import Diagnosis
from app.mailcow.queue import QueueMessage, QueueRecipient
from app.notify.events import build_event
from app.overrides import stuck
from app.overrides.models import Override, OverrideState
from app.worker import recheck
from app.worker.loop import Worker
from app.worker.release import QueueView, releasable, tls_deferred
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import COMMENT, load
from tests.worker.helpers import (
    ROOT_ADMIN,
    SwitchableTransport,
    approved,
    audit_actions,
    audit_after,
    expire_now,
    scrape,
    set_columns,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])
TLSA = "TLSA lookup error for mx.example.org:25"


@pytest.fixture
def settings() -> Settings:
    # The check and the watch are due at once: the tests step with tick().
    return worker_settings(queue_check_seconds=0.0, queue_release_batch=3)


# Whatever a test does, the audit chain it leaves verifies (tests/worker/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_stays_valid")


def deliver_calls(standin: MailcowStandin) -> list[list[str]]:
    return [command.items for command in standin.queue.commands if command.action == "deliver"]


def release_of(engine: Engine, override_id: int) -> dict[str, Any]:
    return dict(load(engine, override_id).queue_release or {})


# ---------------------------------------------------------------------------------------------------------------
# release


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_destination_s_deferred_mail_is_delivered_in_the_pass_that_applies_the_override(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    stuck = standin.queue.fill("example.org", messages=7, recipients_per_message=2, reason=TLSA)
    other = standin.queue.fill("other.example", messages=2, reason=TLSA)
    held = standin.queue.fill("example.org", messages=1, queue_name="hold")
    override_id = approved(client, auth, "example.org")

    await worker.tick()  # one pass: applied, then released

    assert load(engine, override_id).state == S.active
    sent = deliver_calls(standin)
    assert sorted(qid for batch in sent for qid in batch) == sorted(stuck)  # exactly those, by queue id
    assert [len(batch) for batch in sent] == [3, 3, 1]  # TLSO_QUEUE_RELEASE_BATCH
    assert standin.queue.deferred("example.org") == []  # the encrypt row lets them through
    assert sorted(m.queue_id for m in standin.queue.deferred("other.example")) == sorted(other)  # untouched
    assert held[0] in standin.queue.messages and standin.queue.messages[held[0]].queue_name == "hold"
    assert {c.action for c in standin.queue.commands} == {"deliver"}
    [released] = audit_after(engine, override_id, "override.queue_released")
    assert released["released"] == 7 and released["recipients"] == 14 and released["calls"] == 3
    assert [r["reason"] for r in released["reasons"]] == [TLSA] and released["reasons"][0]["failure_class"] == "E"
    assert release_of(engine, override_id)["status"] == "released"

    await worker.tick()  # the check (TLSO_QUEUE_CHECK_SECONDS=0 here)
    record = release_of(engine, override_id)
    assert record["status"] == "clear" and record["still_stuck"] is False
    queue = load(engine, override_id).queue or {}
    assert queue["messages"] == 0 and queue["line"] == "no mail deferred for example.org"  # what reviewers see
    assert audit_actions(engine, override_id)[-2:] == ["override.queue_released", "override.queue_clear"]
    await worker.tick()
    assert len(deliver_calls(standin)) == 3  # released once


async def test_a_useless_override_is_flagged_still_stuck(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    # Only `none` would deliver these (say, a recipient that offers no usable TLS at all): `encrypt` does not help.
    reason = "TLS is required, but was not offered"
    standin.queue.fill("example.org", messages=3, reason=reason, deliverable_under={"none"})
    override_id = approved(client, auth, "example.org")

    await worker.tick()
    assert release_of(engine, override_id)["released"] == 3
    assert len(standin.queue.deferred("example.org")) == 3  # deliver could not let them through

    await worker.tick()
    record = release_of(engine, override_id)
    assert record["status"] == "still_stuck" and record["still_stuck"] is True
    assert record["still_deferred"]["messages"] == 3
    [flag] = audit_after(engine, override_id, "override.still_stuck")
    assert flag["messages"] == 3 and [r["reason"] for r in flag["reasons"]] == [reason]
    read = client.get(f"/v1/overrides/{override_id}", headers=auth(*ROOT_ADMIN))
    assert read.json()["still_stuck"] is True
    assert 'tlso_overrides_still_stuck{target="default"} 1.0' in scrape(client, auth)
    body = json.dumps(read.json())
    assert "rcpt" not in body and "alice.sender" not in body  # counts, reasons and times only


async def test_a_working_override_is_not_flagged_when_other_mail_is_deferred_for_other_reasons(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.queue.fill("example.org", messages=2, reason="Connection timed out", deliverable_under={"none"})
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    await worker.tick()
    assert release_of(engine, override_id)["status"] == "clear"
    assert 'tlso_overrides_still_stuck{target="default"}' not in scrape(client, auth)


@pytest.fixture
async def refreshing(engine: Engine, transport: SwitchableTransport) -> AsyncIterator[Worker]:
    """A worker with the queue refresh on (the tests' default is off), every 300 s."""
    settings = worker_settings(queue_check_seconds=0.0, queue_release_batch=3, queue_refresh_seconds=300.0)
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    yield worker
    await worker.aclose()


def _recheck_now(engine: Engine, override_id: int) -> None:
    """As if `TLSO_QUEUE_REFRESH_SECONDS` had passed: the check of an active override is due again."""
    due = load(engine, override_id).queue_due_at
    assert due is not None and due > utcnow() + timedelta(seconds=200)  # scheduled with the refresh (300 s)
    set_columns(engine, override_id, queue_due_at=utcnow())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_still_stuck_flag_follows_the_queue_while_the_override_is_active(
    client: TestClient, auth: Auth, engine: Engine, refreshing: Worker, standin: MailcowStandin
) -> None:
    reason = "TLS is required, but was not offered"
    standin.queue.fill("example.org", messages=2, reason=reason, deliverable_under={"none"})
    override_id = approved(client, auth, "example.org")
    await refreshing.tick()  # released
    await refreshing.tick()  # checked: flagged
    assert release_of(engine, override_id)["still_stuck"] is True

    _recheck_now(engine, override_id)
    await refreshing.tick()  # the same mail, the same episode: no second event
    assert len(audit_after(engine, override_id, "override.still_stuck")) == 1

    assert len(deliver_calls(standin)) == 1  # released once
    standin.queue.clear()  # the mail went (the recipient fixed its TLS, or an admin dealt with it)
    _recheck_now(engine, override_id)
    await refreshing.tick()
    record = release_of(engine, override_id)
    assert record["status"] == "clear" and record["still_stuck"] is False
    assert (load(engine, override_id).queue or {})["messages"] == 0  # the evidence reviewers read agrees
    assert audit_actions(engine, override_id)[-1] == "override.queue_clear"
    assert 'tlso_overrides_still_stuck{target="default"}' not in scrape(client, auth)

    _recheck_now(engine, override_id)
    await refreshing.tick()  # still clear: no event
    assert audit_actions(engine, override_id).count("override.queue_clear") == 1

    standin.queue.fill("example.org", messages=1, reason=TLSA, deliverable_under={"none"})  # it comes back
    _recheck_now(engine, override_id)
    await refreshing.tick()
    _recheck_now(engine, override_id)
    await refreshing.tick()
    flags = audit_after(engine, override_id, "override.still_stuck")
    assert len(flags) == 2 and flags[-1]["messages"] == 1  # flagged again, once for the new episode
    assert release_of(engine, override_id)["still_stuck"] is True
    assert (load(engine, override_id).queue or {})["messages"] == 1
    assert 'tlso_overrides_still_stuck{target="default"} 1.0' in scrape(client, auth)
    assert deliver_calls(standin) == []  # since the queue was emptied: the checks only look


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_an_override_with_nothing_deferred_writes_no_queue_event_until_mail_defers(
    client: TestClient, auth: Auth, engine: Engine, refreshing: Worker, standin: MailcowStandin
) -> None:
    standin.queue.fill("other.example", messages=2, reason=TLSA)  # another destination's: not ours
    override_id = approved(client, auth, "example.org")
    await refreshing.tick()  # applied; nothing deferred for it: nothing asked of mailcow
    await refreshing.tick()  # the check finds what was expected
    assert audit_actions(engine, override_id)[-1] == "override.applied"
    assert deliver_calls(standin) == []
    record = release_of(engine, override_id)
    assert record["status"] == "clear" and record["released"] == 0

    # New mail defers for TLS after activation: the override does not help it.
    standin.queue.fill("example.org", messages=3, reason=TLSA, deliverable_under={"none"})
    _recheck_now(engine, override_id)
    await refreshing.tick()
    assert audit_actions(engine, override_id)[-1] == "override.still_stuck"
    [flag] = audit_after(engine, override_id, "override.still_stuck")
    assert flag["messages"] == 3
    assert "override.queue_released" not in audit_actions(engine, override_id)


@SQLITE_ONLY
async def test_the_api_shows_a_release_in_flight_without_its_queue_ids(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    noted = {"status": "releasing", "asking": ["4Bx1kQ2fZ3z"], "calls": 0, "deferred": {"messages": 1}}
    set_columns(engine, override_id, queue_release=noted)  # as a worker killed after deliver left it
    body = client.get(f"/v1/overrides/{override_id}", headers=auth(*ROOT_ADMIN)).json()
    assert body["queue_release"] == {"status": "releasing", "calls": 0, "deferred": {"messages": 1}}


@SQLITE_ONLY
async def test_a_queue_mailcow_cannot_read_is_released_when_it_can(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    worker: Worker,
    standin: MailcowStandin,
) -> None:
    stuck = standin.queue.fill("example.org", messages=2, reason=TLSA)
    standin.queue.dockerapi = "down"  # mailcow's HTML 500: its dockerapi container is unreachable
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    assert load(engine, override_id).state == S.active
    assert release_of(engine, override_id) == {} and deliver_calls(standin) == []
    assert "override.queue_released" not in audit_actions(engine, override_id)

    standin.queue.dockerapi = "up"
    await worker.tick()  # retried (TLSO_RETRY_INITIAL_SECONDS=0 and the check's 0 s here)
    assert sorted(qid for batch in deliver_calls(standin) for qid in batch) == sorted(stuck)
    assert release_of(engine, override_id)["status"] == "released"


@SQLITE_ONLY
async def test_mail_beyond_the_10000_mailcow_lists_is_released_too(
    client: TestClient, auth: Auth, engine: Engine, transport: SwitchableTransport, standin: MailcowStandin
) -> None:
    standin.queue.fill("example.org", messages=10_004, reason=TLSA)
    override_id = approved(client, auth, "example.org")
    worker = Worker(engine, worker_settings(queue_release_batch=1000), owner="w1", transports={"default": transport})
    try:
        await worker.tick()
    finally:
        await worker.aclose()
    assert standin.queue.deferred("example.org") == []
    assert [len(batch) for batch in deliver_calls(standin)] == [1000] * 10 + [4]  # read again after the first 10,000
    record = release_of(engine, override_id)
    assert record["released"] == 10_004 and record["calls"] == 11 and record["queue_capped"] is False


@SQLITE_ONLY
async def test_a_next_hop_override_releases_nothing(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.queue.fill("example.org", messages=2, reason=TLSA)
    override_id = approved(client, auth, "[mx.example.org]:25")
    await worker.tick()
    await worker.tick()
    assert load(engine, override_id).state == S.active
    assert deliver_calls(standin) == [] and load(engine, override_id).queue_release is None


class DeliverGate(SwitchableTransport):
    """Holds the first `deliver` until a second one arrives (or `hold` seconds pass), so that a second worker
    has every chance to enter the same release while the first is inside it: `most_inside` says how many were."""

    def __init__(self, app: Any, hold: float = 3.0) -> None:
        super().__init__(app)
        self.hold, self.inside, self.most_inside = hold, 0, 0
        self.second = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or b'"deliver"' not in request.content:
            return await super().handle_async_request(request)
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.inside == 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.second.wait(), self.hold)
            else:
                self.second.set()
            return await super().handle_async_request(request)
        finally:
            self.inside -= 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_two_workers_racing_release_once(
    client: TestClient, auth: Auth, engine: Engine, settings: Settings, standin_app: Any, standin: MailcowStandin
) -> None:
    stuck = standin.queue.fill("example.org", messages=5, reason=TLSA)
    override_id = approved(client, auth, "example.org")
    gate = DeliverGate(standin_app, hold=0.0)
    first = Worker(engine, settings, owner="w1", transports={"default": gate})
    await first.tick()  # applied and released
    set_columns(engine, override_id, queue_release=None, queue_due_at=utcnow())  # due again, for both at once
    standin.queue.fill("example.org", messages=1, reason=TLSA)
    standin.queue.commands.clear()

    gate.hold = 3.0  # the first worker inside the release waits there for a second one (none may come)
    workers = [Worker(engine, settings, owner=f"r{n}", transports={"default": gate}) for n in range(2)]
    try:
        for _ in range(3):
            await asyncio.gather(*(worker.tick() for worker in workers))
    finally:
        for worker in [first, *workers]:
            await worker.aclose()
    assert gate.most_inside == 1  # while one worker was inside the release, the other could not claim it
    assert len(deliver_calls(standin)) == 1  # one worker released it; the other found it leased or done
    released = audit_after(engine, override_id, "override.queue_released")
    assert len(released) == 2 and released[-1]["released"] == 1
    assert all(qid not in standin.queue.messages for qid in stuck)


# ---------------------------------------------------------------------------------------------------------------
# the watch after the end


async def _active_then_ended(client: TestClient, auth: Auth, engine: Engine, worker: Worker) -> int:
    override_id = approved(client, auth, "example.org")
    await worker.tick()  # applied, released
    await worker.tick()  # checked
    expire_now(engine, override_id)
    await worker.tick()  # removal started, removed: the watch is due
    assert load(engine, override_id).state == S.expired
    return override_id


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_mail_deferred_for_tls_after_the_end_raises_still_failing_once_per_episode(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = await _active_then_ended(client, auth, engine, worker)
    assert release_of(engine, override_id)["status"] == "watching"
    assert "recipient.still_failing" not in audit_actions(engine, override_id)

    standin.queue.fill("example.org", messages=2, reason="Server certificate not verified")  # no row: dane
    await worker.tick()
    await worker.tick()  # still deferred: the same episode, no second event
    [event] = audit_after(engine, override_id, "recipient.still_failing")
    assert event["messages"] == 2 and [r["reason"] for r in event["reasons"]] == ["Server certificate not verified"]
    assert event["request_again"] == {"target": "default", "destination": "example.org", "policy": "encrypt"}
    assert release_of(engine, override_id)["failing"] is True

    standin.queue.clear()  # the queue empties: the episode ends
    await worker.tick()
    assert release_of(engine, override_id)["failing"] is False
    standin.queue.fill("example.org", messages=1, reason=TLSA)  # a new episode
    await worker.tick()
    assert len(audit_after(engine, override_id, "recipient.still_failing")) == 2
    assert deliver_calls(standin) == []  # the watch only looks


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_release_the_end_cut_short_is_audited_once_by_the_watch_and_not_asked_again(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    """A worker noted the ids and asked mailcow (or was about to), then died; the override expired before
    another worker took the pass over. The watch puts the release on record, with the end that cut it
    short, and does not ask mailcow again: the override's row is gone, so delivering would only defer again."""
    override_id = approved(client, auth, "example.org")
    await worker.tick()  # applied; nothing deferred yet
    asked = standin.queue.fill("example.org", messages=2, reason=TLSA)
    noted = {"status": "releasing", "asking": asked, "calls": 0, "deferred": {"messages": 2, "recipients": 2}}
    set_columns(engine, override_id, queue_release=noted, queue_due_at=None)  # as a worker killed after deliver
    expire_now(engine, override_id)
    await worker.tick()  # removed, and the watch due at once
    await worker.tick()  # a later pass: nothing more on record
    assert load(engine, override_id).state == S.expired
    [released] = audit_after(engine, override_id, "override.queue_released")
    assert released["released"] == 2 and released["interrupted"] == "expired" and released["messages"] == 2
    actions = audit_actions(engine, override_id)
    assert actions.index("override.queue_released") < actions.index("recipient.still_failing")  # still deferred
    assert deliver_calls(standin) == []
    record = release_of(engine, override_id)
    assert record["status"] == "watching" and "asking" not in record


@SQLITE_ONLY
async def test_the_still_failing_event_carries_a_link_to_request_again(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = await _active_then_ended(client, auth, engine, worker)
    standin.queue.fill("example.org", messages=1, reason=TLSA)
    await worker.tick()
    settings = worker_settings(public_base_url="https://tlso.example.com")
    with Session(engine) as session:
        row = session.exec(select(AuditEvent).where(AuditEvent.action == "recipient.still_failing")).one()
        override = session.get(Override, override_id)
        trail = session.exec(select(AuditEvent).where(AuditEvent.override_id == override_id)).all()
        event = build_event(row, settings, override, [], trail)
    assert event.type == "recipient.still_failing"
    assert event.data.override is not None
    assert event.data.override.links.request_again == "https://tlso.example.com/v1/overrides"
    assert event.data.details is not None and event.data.details["request_again"]["destination"] == "example.org"


@SQLITE_ONLY
async def test_the_watch_ends_after_its_window(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = await _active_then_ended(client, auth, engine, worker)
    record = release_of(engine, override_id)
    past = (datetime.fromisoformat(record["watch_until"]) - timedelta(days=2)).isoformat()
    set_columns(engine, override_id, queue_release={**record, "watch_until": past})
    await worker.tick()
    assert release_of(engine, override_id)["status"] == "watched"
    assert load(engine, override_id).queue_due_at is None
    standin.queue.fill("example.org", messages=1, reason=TLSA)
    await worker.tick()
    assert "recipient.still_failing" not in audit_actions(engine, override_id)


@SQLITE_ONLY
async def test_a_cancelled_override_is_not_watched(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    cancelled = client.post(f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester"))
    assert cancelled.status_code == 200, cancelled.text
    standin.queue.fill("example.org", messages=1, reason=TLSA)
    await worker.tick()
    await worker.tick()
    assert load(engine, override_id).state == S.cancelled
    assert load(engine, override_id).queue_release is None and deliver_calls(standin) == []


def _diagnosis(verdict: str, clean: bool) -> Diagnosis:
    return Diagnosis.model_construct(
        domain="example.org",
        verdict=verdict,
        failure_class=None if clean else "A",
        recommended=None,
        explanation="TLSA records match" if clean else "no TLSA record matches the certificate",
        resolver_validates=True,
        null_mx=False,
        hosts=[],
        checked_at=datetime.now(UTC),
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_recipient_that_breaks_again_after_a_remediated_end_raises_regressed(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    # The recipient fixed DANE: the remediation watch counted its clean checks and ended the override.
    with transaction(engine) as session:
        override = session.exec(select(Override).where(col(Override.id) == override_id)).one()
        override.clean_checks = 3
    revoked = client.post(f"/v1/overrides/{override_id}/revoke", json=COMMENT, headers=auth(*ROOT_ADMIN))
    assert revoked.status_code == 200, revoked.text
    await worker.tick()
    assert load(engine, override_id).state == S.revoked
    settings = worker_settings(recheck_interval_seconds=0)

    async def blocked(domain: str) -> Diagnosis:
        return _diagnosis("blocked", clean=False)

    monkeypatch.setattr(recheck, "is_clean", lambda diagnosis: diagnosis.verdict == "ok")
    assert await recheck.recheck_due(engine, settings, blocked) == 1
    assert await recheck.recheck_due(engine, settings, blocked) == 1  # still blocked: the same episode
    [event] = audit_after(engine, override_id, "recipient.regressed")
    assert event["verdict"] == "blocked" and event["ended"] == "revoked"
    assert event["request_again"]["destination"] == "example.org"

    async def fixed(domain: str) -> Diagnosis:
        return _diagnosis("ok", clean=True)

    await recheck.recheck_due(engine, settings, fixed)
    await recheck.recheck_due(engine, settings, blocked)  # broken again: a new episode
    assert len(audit_after(engine, override_id, "recipient.regressed")) == 2

    set_columns(engine, override_id, ended_at=utcnow() - timedelta(days=2))  # past TLSO_QUEUE_WATCH_SECONDS
    assert await recheck.recheck_due(engine, settings, blocked) == 0


# ---------------------------------------------------------------------------------------------------------------
# what the release adds to app/overrides/stuck.py's rules


def _message(queue: str, *recipients: tuple[str, str | None]) -> QueueMessage:
    return QueueMessage(
        queue_id="ABC",
        queue_name=queue,
        arrival_time=datetime(2026, 12, 7, tzinfo=UTC),
        recipients=tuple(QueueRecipient(domain, reason) for domain, reason in recipients),
    )


def test_only_mail_waiting_for_tls_at_the_destination_counts_as_still_stuck() -> None:
    mixed = _message("deferred", ("other.example", TLSA), ("example.org", "Connection timed out"))
    tls = _message("deferred", ("example.org", "Server certificate not verified"))
    held = _message("hold", ("example.org", TLSA))
    assert tls_deferred([mixed, tls, held], "example.org") == [tls]
    assert tls_deferred([tls], "[mx.example.org]:25") == []  # a next hop covers no recipient domain
    assert not releasable("[mx.example.org]:25") and releasable(".example.org")


def test_the_queue_view_finds_what_the_shared_rule_finds() -> None:
    queue = [
        _message("deferred", ("example.org", TLSA), ("other.example", TLSA)),
        _message("deferred", ("sub.example.org", TLSA)),
        _message("hold", ("example.org", TLSA)),
        _message("deferred", ("xn--strae-oqa.example", TLSA)),
    ]
    queue = [replace(m, queue_id=f"A{n}") for n, m in enumerate(queue)]
    view = QueueView(queue)
    for destination in ("example.org", ".example.org", "other.example", "xn--strae-oqa.example", "[mx.example.org]"):
        assert view.deferred_for(destination) == stuck.deferred_for(queue, destination), destination
