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

from app.core.config import Settings
from app.core.db import utcnow
from app.overrides.models import OverrideState
from app.worker.loop import Worker
from devtools.mailcow_standin import Fault, MailcowStandin
from tests.helpers import COMMENT, load
from tests.standin import ServedStandin, calls, fault
from tests.worker.helpers import SwitchableTransport, approved, set_columns, settle, worker_settings

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


def _slow_mailcow(client: TestClient, served: ServedStandin, attempts: int) -> Settings:
    """A mailcow over real HTTP whose answers can time out (0.5 s), with a short wait for late adds."""
    settings = worker_settings(
        mailcow_url=served.url,
        mailcow_timeout_seconds=0.5,
        mailcow_attempts=attempts,
        mailcow_add_settle_seconds=5.0,
    )
    client.app.state.settings = settings  # type: ignore[attr-defined]
    return settings


LATE_ADDS = {
    # the only attempt's answer is lost; mailcow commits 1.5 s later
    "one lost answer": (1, [Fault(op="add", mode="timeout", count=1, delay=1.5)], 0.5),
    # two slow 500s (retried), then a lost answer: the wait counts from the end of the batch
    "lost after retries": (
        3,
        [Fault(op="add", mode="http500", count=2, delay=0.4), Fault(op="add", mode="timeout", count=1, delay=2.0)],
        1.3,
    ),
    # attempt 1's answer is lost, attempt 2 gets an empty 200: that says nothing of attempt 1
    "refusal after a retry": (
        2,
        [Fault(op="add", mode="timeout", count=1, delay=1.5), Fault(op="add", mode="empty", count=1)],
        0.5,
    ),
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", LATE_ADDS)
async def test_an_add_that_lands_after_a_cancel_is_removed_not_orphaned(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    served_standin: ServedStandin,
    case: str,
) -> None:
    attempts, faults, batch_at_least = LATE_ADDS[case]
    settings = _slow_mailcow(client, served_standin, attempts)
    override_id = approved(client, auth, "example.org")
    for one in faults:
        standin.add_fault(one)
    worker = Worker(engine, settings, owner="w1")
    try:
        started = utcnow()
        await worker.tick()
        assert load(engine, override_id).state == S.approved
        sent = load(engine, override_id).add_sent_at  # set when the batch ended, not when it began
        assert sent is not None and (sent - started).total_seconds() >= batch_at_least
        cancelled = client.post(f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester"))
        assert cancelled.json()["state"] == "removing", cancelled.text
        await worker.tick()
        assert load(engine, override_id).state == S.removing  # waits: the unanswered add may still land
        await asyncio.sleep(2.5)  # ... it lands
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
    settings = _slow_mailcow(client, served_standin, attempts=2)
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
    from app.mailcow.client import MailcowClient
    from app.mailcow.errors import MailcowProtocolError

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
    from app.mailcow.policy_map import PolicyMap
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
