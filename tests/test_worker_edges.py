"""Edge cases of the worker found in review: which rows are ours, and how long an unanswered add may
still land. Each of these failed before its fix."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.db import utcnow
from app.mailcow.standin import Fault, MailcowStandin
from app.overrides.models import OverrideState
from app.worker.loop import Worker
from tests.worker_fixtures import *  # noqa: F403  (the fixtures)
from tests.worker_fixtures import (
    COMMENT,
    ServedStandin,
    SwitchableTransport,
    approved,
    calls,
    fault,
    load,
    set_columns,
    settle,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


@SQLITE_ONLY
async def test_a_cancel_before_any_add_is_immediate_and_leaves_a_humans_identical_row(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    fault(standin, "get", "http500", count=10)  # first attempt cannot read the map: nothing is sent
    await worker.tick()
    standin.clear_faults()
    assert load(engine, override_id).add_sent_at is None
    assert calls(standin, "add") == []
    standin.seed_row("example.org", "encrypt", "")  # a human's own row, identical content
    cancelled = client.post(f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester"))
    assert cancelled.json()["state"] == "cancelled", cancelled.text  # nothing was sent: nothing to remove
    await settle(worker)
    assert calls(standin, "add") == []
    assert [(r["dest"], r["policy"]) for r in standin.rows()] == [("example.org", "encrypt")], "human row deleted"


@SQLITE_ONLY
async def test_the_settle_time_counts_from_the_last_unanswered_attempt(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, served_standin: ServedStandin
) -> None:
    settings = worker_settings(
        mailcow_url=served_standin.url,
        mailcow_timeout_seconds=0.5,
        mailcow_attempts=3,
        mailcow_add_settle_seconds=5.0,
    )
    client.app.state.settings = settings  # type: ignore[attr-defined]
    override_id = approved(client, auth, "example.org")
    # two slow 5xx answers (retried by the client), then an attempt whose answer is lost and that commits late
    standin.add_fault(Fault(op="add", mode="http500", count=2, delay=0.4))
    standin.add_fault(Fault(op="add", mode="timeout", count=1, delay=2.0))
    worker = Worker(engine, settings, owner="w1")
    try:
        started = utcnow()
        await worker.tick()
        assert load(engine, override_id).state == S.approved
        # 0.4 s + 0.4 s of 500s, then 0.5 s until the lost answer times out: the marker is set after that.
        sent = load(engine, override_id).add_sent_at
        assert sent is not None and (sent - started).total_seconds() >= 1.3
        cancelled = client.post(f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester"))
        assert cancelled.json()["state"] == "removing", cancelled.text
        await worker.tick()
        assert load(engine, override_id).state == S.removing  # waits: the unanswered add may still land
        await asyncio.sleep(2.5)  # the third attempt lands
        assert len(standin.rows()) == 1
        set_columns(engine, override_id, next_attempt_at=utcnow())
        await worker.tick()
    finally:
        await worker.aclose()
    assert load(engine, override_id).state == S.cancelled and standin.rows() == []


@SQLITE_ONLY
async def test_a_refusal_after_a_retry_still_waits_for_the_first_attempt(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, served_standin: ServedStandin
) -> None:
    settings = worker_settings(
        mailcow_url=served_standin.url, mailcow_timeout_seconds=0.5, mailcow_attempts=2, mailcow_add_settle_seconds=5.0
    )
    client.app.state.settings = settings  # type: ignore[attr-defined]
    override_id = approved(client, auth, "example.org")
    standin.add_fault(Fault(op="add", mode="timeout", count=1, delay=1.5))  # attempt 1: answer lost, commits at 1.5 s
    standin.add_fault(Fault(op="add", mode="empty", count=1))  # attempt 2: empty 200 (a transient DB error)
    worker = Worker(engine, settings, owner="w1")
    try:
        await worker.tick()
        cancelled = client.post(f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester"))
        assert cancelled.json()["state"] == "removing", cancelled.text
        await worker.tick()
        assert load(engine, override_id).state == S.removing  # the empty 200 says nothing of attempt 1
        await asyncio.sleep(2.0)  # attempt 1 lands
        assert len(standin.rows()) == 1
        set_columns(engine, override_id, next_attempt_at=utcnow())
        await worker.tick()
    finally:
        await worker.aclose()
    assert load(engine, override_id).state == S.cancelled and standin.rows() == []


@SQLITE_ONLY
async def test_our_own_late_row_is_adopted_not_a_conflict(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, served_standin: ServedStandin
) -> None:
    settings = worker_settings(
        mailcow_url=served_standin.url, mailcow_timeout_seconds=0.5, mailcow_attempts=2, mailcow_add_settle_seconds=5.0
    )
    client.app.state.settings = settings  # type: ignore[attr-defined]
    override_id = approved(client, auth, "example.org")
    standin.add_fault(Fault(op="add", mode="timeout", count=1, delay=1.5))
    standin.add_fault(Fault(op="add", mode="empty", count=1))
    worker = Worker(engine, settings, owner="w1")
    try:
        await worker.tick()
        await asyncio.sleep(2.0)  # attempt 1 lands
        set_columns(engine, override_id, next_attempt_at=utcnow())
        await worker.tick()
    finally:
        await worker.aclose()
    o = load(engine, override_id)
    assert o.state == S.active and o.conflict is None  # adopted: it is ours
    assert o.mailcow_id == standin.rows()[0]["id"] and len(standin.rows()) == 1


@SQLITE_ONLY
async def test_a_final_unclear_add_is_cleaned_up_when_the_apply_fails(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    transport: SwitchableTransport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.mailcow.client import MailcowClient, MailcowProtocolError

    settings = worker_settings(apply_max_attempts=1)
    client.app.state.settings = settings  # type: ignore[attr-defined]
    override_id = approved(client, auth, "example.org")
    real_add = MailcowClient.add_policy

    async def add_then_garbled(self: Any, dest: str, policy: str, parameters: str = "") -> None:
        await real_add(self, dest, policy, parameters)  # mailcow commits ...
        raise MailcowProtocolError("add: unexpected answer (a proxy rewrote it)")  # ... the answer is unusable

    monkeypatch.setattr(MailcowClient, "add_policy", add_then_garbled)
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    try:
        await settle(worker, 3)
    finally:
        await worker.aclose()
    o = load(engine, override_id)
    assert (o.state, o.end_reason) == (S.failed, "apply_failed") and standin.rows() == []
    assert "unexpected answer" in (o.last_error or "")  # the apply's error, not the cleanup's


def test_a_removal_never_takes_an_identical_row_when_no_add_of_ours_is_known() -> None:
    from app.mailcow.client import PolicyRow
    from app.targets.service import PolicyMap
    from app.worker.remove import plan_removal
    from app.worker.store import Job

    human = PolicyRow(id=7, dest="example.org", policy="encrypt", parameters="", active=1, created=None, modified=None)
    job = Job(
        id=1,
        state=S.removing,
        target="default",
        destination="example.org",
        policy="encrypt",
        parameters="",
        mailcow_id=None,
        attempts=0,
        conflict=None,
        end_reason="revoked",
        due_at=None,
        add_sent_at=None,
    )
    assert plan_removal(job, PolicyMap([human])).ids == frozenset()  # nobody sent it: not ours
    sent = dataclasses.replace(job, add_sent_at=utcnow())
    assert plan_removal(sent, PolicyMap([human])).ids == {7}  # an add of ours may have made it
