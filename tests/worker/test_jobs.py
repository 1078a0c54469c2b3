"""The worker's jobs, stepped one tick at a time against the mailcow stand-in (SQLite and PostgreSQL).

apply (add, find the id, record; adopt after a crash; conflicts and their resolution), removal
(expiry, revoke, cancel; verified; retried until done; overdue), lapse, retries on 500s / empty
bodies / an unreachable mailcow / a rejected key, reconcile (drift alert and reapply; foreign rows
untouched), metrics. Every test ends with a valid audit chain.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.mailcow.client import MailcowClient
from app.mailcow.errors import MailcowRejected
from app.overrides.models import Override, OverrideState
from app.targets.models import MailcowTarget
from app.worker import apply as apply_module
from app.worker import reconcile as reconcile_module
from app.worker import remove as remove_module
from app.worker import store
from app.worker.loop import Worker
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import COMMENT, load
from tests.standin import calls, fault, mailcow_rows
from tests.worker.helpers import (
    BOB,
    ROOT_ADMIN,
    SwitchableTransport,
    approved,
    audit_actions,
    audit_after,
    expire_lease,
    expire_now,
    reconcile_now,
    scrape,
    set_columns,
    settle,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]
# The job logic does not depend on the database; the tests that touch claims, locks and the state machine's
# SQL run on both backends, the rest on SQLite only (test_worker_faults/_concurrency cover PostgreSQL too).
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


# Whatever a test does, the audit chain it leaves verifies (tests/worker/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_stays_valid")


# ---------------------------------------------------------------------------------------------------------------
# apply


async def test_apply_adds_an_active_row_and_records_its_id(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org", policy="secure", parameters="match=nexthop:dot-nexthop")
    await worker.tick()
    override = load(engine, override_id)
    row = mailcow_rows(standin)["example.org"]
    assert override.state == S.active
    assert override.mailcow_id == row["id"]
    assert (row["policy"], row["parameters"], row["active"]) == ("secure", "match=nexthop:dot-nexthop", 1)
    assert override.applied_at is not None and override.expires_at is not None
    assert override.expires_at - override.applied_at == timedelta(days=3)  # the clock starts at apply
    assert override.lease_owner is None and override.last_error is None
    assert [c["op"] for c in calls(standin, "add")] == ["add"]
    # ... and its destination's queue looked at in the same pass (app/worker/release.py): nothing was deferred,
    # so nothing was asked of mailcow and no event says so (the check still watches for mail that defers later)
    assert audit_actions(engine, override_id)[-1] == "override.applied"
    assert (override.queue_release or {})["released"] == 0 and override.queue_due_at is not None
    after = audit_after(engine, override_id, "override.applied")[0]
    assert after["state"] == "active" and after["adopted"] is False and after["worker"] == "w1"
    # the API shows it
    body = client.get(f"/v1/overrides/{override_id}", headers=auth(*BOB)).json()
    assert body["state"] == "active" and body["mailcow_id"] == row["id"]


async def test_a_row_added_before_a_crash_is_adopted_not_duplicated(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, settings: Settings
) -> None:
    override_id = approved(client, auth, "example.org")
    # A worker claimed it, added the row, and died before recording anything.
    [job] = store.claim(engine, S.approved, "dead-worker", lease_seconds=30, limit=5)
    assert job.first_attempt
    assert store.mark_add_sent(engine, [override_id], "dead-worker", S.approved) == [override_id]
    standin.seed_row("example.org", "encrypt", "")
    await worker.tick()
    assert load(engine, override_id).state == S.approved  # the dead worker's lease still holds
    expire_lease(engine, override_id)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.active and override.conflict is None
    assert override.mailcow_id == mailcow_rows(standin)["example.org"]["id"]
    assert calls(standin, "add") == []  # adopted, never added twice
    assert audit_after(engine, override_id, "override.applied")[0]["adopted"] is True


@SQLITE_ONLY
async def test_an_add_whose_answer_was_lost_is_adopted(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    fault(standin, "add", "drop_after_commit")  # added, but the client sees a 500 and retries: "entry exists"
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.active and override.conflict is None
    assert len(standin.rows()) == 1 and override.mailcow_id == standin.rows()[0]["id"]


@SQLITE_ONLY
async def test_a_foreign_row_is_a_conflict_even_when_identical(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    foreign = standin.seed_row("example.org", "encrypt", "")  # same content, but it was there first
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and override.mailcow_id is None
    assert override.conflict is not None and override.conflict["status"] == "open"
    assert override.conflict["row"]["id"] == foreign["id"]
    assert calls(standin, "add", "edit", "delete") == []
    assert audit_actions(engine, override_id)[-1] == "override.conflict"
    body = client.get(f"/v1/overrides/{override_id}", headers=auth(*BOB)).json()
    assert body["conflict"]["row"]["dest"] == "example.org"
    # nothing more happens until an admin decides
    standin.calls.clear()
    await settle(worker)
    assert calls(standin, "add", "edit", "delete") == []
    assert load(engine, override_id).state == S.approved


@SQLITE_ONLY
async def test_a_different_row_found_on_a_retry_is_a_conflict(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    store.claim(engine, S.approved, "dead-worker", lease_seconds=30, limit=5)
    standin.seed_row("example.org", "none", "")  # not ours: a different policy
    expire_lease(engine, override_id)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and override.conflict and override.conflict["row"]["policy"] == "none"
    assert mailcow_rows(standin)["example.org"]["policy"] == "none"


async def test_replace_conflict_applies_ours_and_restores_the_original_at_the_end(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.seed_row("example.org", "may", "", active=0)
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    assert load(engine, override_id).conflict is not None
    decided = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict",
        json={**COMMENT, "action": "replace"},
        headers=auth(*ROOT_ADMIN),
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["conflict"]["status"] == "replace"
    await worker.tick()
    override = load(engine, override_id)
    row = mailcow_rows(standin)["example.org"]
    assert override.state == S.active and override.mailcow_id == row["id"]
    assert (row["policy"], row["active"]) == ("encrypt", 1)
    assert override.conflict and override.conflict["status"] == "replaced"

    expire_now(engine, override_id)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.expired
    restored = mailcow_rows(standin)["example.org"]
    assert (restored["policy"], restored["parameters"], restored["active"]) == ("may", "", 0)
    assert override.conflict and override.conflict["status"] == "restored"
    assert audit_actions(engine, override_id)[-7:] == [
        "override.conflict",
        "override.conflict_resolved",
        "override.conflict_replaced",
        "override.applied",
        "override.expired",
        "override.conflict_restoring",
        "override.removed",
    ]


@SQLITE_ONLY
async def test_abandon_conflict_fails_the_override_and_leaves_the_row(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.seed_row("example.org", "none", "")
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    denied = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict", json={**COMMENT, "action": "abandon"}, headers=auth(*BOB)
    )
    assert denied.status_code == 403
    decided = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict",
        json={**COMMENT, "action": "abandon"},
        headers=auth(*ROOT_ADMIN),
    )
    assert decided.status_code == 200 and decided.json()["state"] == "failed"
    again = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict",
        json={**COMMENT, "action": "replace"},
        headers=auth(*ROOT_ADMIN),
    )
    assert again.status_code == 409
    await settle(worker)
    assert mailcow_rows(standin)["example.org"]["policy"] == "none"
    assert calls(standin, "add", "delete", "edit") == []


async def test_cancel_while_the_add_is_in_flight_removes_the_row(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, monkeypatch: Any
) -> None:
    override_id = approved(client, auth, "example.org")

    def cancel_now(point: str) -> None:
        if point == "after_add":  # the requester cancels between the add and its record
            response = client.post(
                f"/v1/overrides/{override_id}/cancel", json=COMMENT, headers=auth("alice", "requester")
            )
            assert response.status_code == 200 and response.json()["state"] == "removing"

    monkeypatch.setattr(apply_module, "crash_point", cancel_now)
    await worker.tick()  # apply: its record is refused (state changed); removal follows next tick
    assert load(engine, override_id).state == S.removing
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.cancelled and override.lease_owner is None
    assert standin.rows() == []
    assert "override.applied" not in audit_actions(engine, override_id)


@SQLITE_ONLY
async def test_permanent_rejection_fails_the_override(
    client: TestClient, auth: Auth, engine: Engine, settings: Settings, transport: SwitchableTransport
) -> None:
    # mailcow's add refuses a leading-dot dest that Postfix (and its edit form) would accept.
    settings = worker_settings(mailcow_supports_subdomain_dest=True)
    client.app.state.settings = settings  # type: ignore[attr-defined]
    override_id = approved(client, auth, ".sub.example.org")
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    try:
        await worker.tick()
    finally:
        await worker.aclose()
    override = load(engine, override_id)
    assert override.state == S.failed and override.end_reason == "apply_failed"
    assert "destination is invalid" in (override.last_error or "")
    assert audit_actions(engine, override_id)[-1] == "override.apply_failed"


# ---------------------------------------------------------------------------------------------------------------
# removal


async def test_expiry_removes_the_row_then_records_it(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    row_id = load(engine, override_id).mailcow_id
    expire_now(engine, override_id)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.expired and override.ended_at is not None
    assert standin.rows() == []
    assert [c["body"] for c in calls(standin, "delete")] == [f"[{row_id}]"]
    actions = audit_actions(engine, override_id)
    assert actions[-2:] == ["override.expired", "override.removed"]
    assert audit_after(engine, override_id, "override.removed")[0]["deleted_ids"] == [row_id]


@pytest.mark.parametrize(
    ("action", "who", "end"), [("revoke", ROOT_ADMIN, S.revoked), ("cancel", ("alice", "requester"), S.cancelled)]
)
@SQLITE_ONLY
async def test_revoke_or_cancel_after_apply_removes_the_row(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    worker: Worker,
    standin: MailcowStandin,
    action: str,
    who: tuple[str, str],
    end: OverrideState,
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    response = client.post(f"/v1/overrides/{override_id}/{action}", json=COMMENT, headers=auth(*who))
    assert response.status_code == 200 and response.json()["state"] == "removing"
    await worker.tick()
    assert load(engine, override_id).state == end
    assert standin.rows() == []


async def test_removal_is_retried_until_done_and_turns_overdue(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    expire_now(engine, override_id)
    fault(standin, "delete", "http500", count=100)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.removing and override.attempts == 1 and "HTTP 500" in (override.last_error or "")
    assert len(standin.rows()) == 1
    set_columns(engine, override_id, removal_deadline=utcnow() - timedelta(seconds=1))
    await worker.tick()
    await worker.tick()
    body = client.get(f"/v1/overrides/{override_id}", headers=auth(*BOB)).json()
    assert body["state"] == "removing" and body["overdue"] is True
    overdue = client.get("/v1/overrides", params={"overdue": "true"}, headers=auth(*BOB)).json()["items"]
    assert [item["id"] for item in overdue] == [override_id]
    assert audit_actions(engine, override_id).count("override.removal_overdue") == 1  # once, not per attempt
    assert "tlso_overrides_overdue 1.0" in scrape(client, auth)
    standin.clear_faults()
    await worker.tick()
    assert load(engine, override_id).state == S.expired and standin.rows() == []
    assert "tlso_overrides_overdue 0.0" in scrape(client, auth)


@SQLITE_ONLY
async def test_a_lost_delete_answer_is_verified_not_trusted(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    expire_now(engine, override_id)
    fault(standin, "delete", "drop_after_commit")  # deleted, but the answer is a 500: the client retries
    await worker.tick()
    assert load(engine, override_id).state == S.expired and standin.rows() == []
    assert len(calls(standin, "delete")) == 2  # the retry "succeeds" for a gone id; the map read confirms it


# ---------------------------------------------------------------------------------------------------------------
# time-driven transitions


@SQLITE_ONLY
async def test_an_undecided_request_lapses(client: TestClient, auth: Auth, engine: Engine, worker: Worker) -> None:
    created = client.post(
        "/v1/overrides",
        json={"destination": "example.org", "policy": "encrypt", "justification": "Recipient TLSA records are stale."},
        headers=auth("alice", "requester"),
    )
    override_id = int(created.json()["id"])
    set_columns(engine, override_id, review_deadline=utcnow() - timedelta(seconds=1))
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.lapsed and override.end_reason == "lapsed"
    assert audit_actions(engine, override_id)[-1] == "override.lapsed"


@SQLITE_ONLY
async def test_tick_reports_the_next_due_time(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, settings: Settings
) -> None:
    override_id = approved(client, auth, "example.org", duration="PT30S")
    await worker.tick()
    result = await worker.tick()
    expires_at = load(engine, override_id).expires_at
    assert expires_at is not None and result.next_due == expires_at
    assert 0 < worker._delay(result) <= settings.worker_poll_seconds


@SQLITE_ONLY
async def test_the_running_loop_applies_within_a_second_and_removes_at_expiry(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(0.3)
        override_id = await asyncio.to_thread(approved, client, auth, "example.org", duration="PT1S")
        approved_at = time.monotonic()
        while load(engine, override_id).state != S.active:
            assert time.monotonic() - approved_at < 1.0, "not applied within a second"
            await asyncio.sleep(0.02)
        while load(engine, override_id).state != S.expired:
            assert time.monotonic() - approved_at < 4.0, "not removed within a few seconds of its expiry"
            await asyncio.sleep(0.05)
        assert standin.rows() == []
    finally:
        stop.set()
        await loop


# ---------------------------------------------------------------------------------------------------------------
# mailcow failures


@SQLITE_ONLY
@pytest.mark.parametrize(("mode", "count"), [("http500", 5), ("empty", 2)])
async def test_apply_retries_on_500s_and_empty_bodies(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, mode: str, count: int
) -> None:
    override_id = approved(client, auth, "example.org")
    fault(standin, "add", mode, count=count)  # 500s: more than the client's own 3 attempts
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and override.attempts == 1 and override.last_error
    assert override.lease_owner is None and override.next_attempt_at is not None
    await settle(worker, 3)
    override = load(engine, override_id)
    assert override.state == S.active and len(standin.rows()) == 1


@SQLITE_ONLY
async def test_backoff_grows_between_attempts(
    client: TestClient, auth: Auth, engine: Engine, transport: SwitchableTransport
) -> None:
    settings = worker_settings(retry_initial_seconds=10.0, retry_max_seconds=1000.0)
    override_id = approved(client, auth, "example.org")
    transport.down = True
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    try:
        delays = []
        for _ in range(3):
            await worker.tick()
            override = load(engine, override_id)
            assert override.next_attempt_at is not None
            delays.append((override.next_attempt_at - utcnow()).total_seconds())
            set_columns(engine, override_id, next_attempt_at=utcnow())
    finally:
        await worker.aclose()
    assert 7 < delays[0] < 13 and 15 < delays[1] < 25 and 30 < delays[2] < 50


@SQLITE_ONLY
async def test_an_unreachable_mailcow_is_waited_out(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    worker: Worker,
    standin: MailcowStandin,
    transport: SwitchableTransport,
) -> None:
    first = approved(client, auth, "a.example")
    await worker.tick()
    second = approved(client, auth, "b.example")
    expire_now(engine, first)
    transport.down = True
    await settle(worker, 3)
    assert load(engine, first).state == S.removing and load(engine, second).state == S.approved
    assert "unavailable" in (load(engine, second).last_error or "")
    transport.down = False
    await settle(worker, 2)
    assert load(engine, first).state == S.expired and load(engine, second).state == S.active
    assert list(mailcow_rows(standin)) == ["b.example"]


@SQLITE_ONLY
async def test_a_rejected_key_pauses_the_target_instead_of_looping(
    client: TestClient, auth: Auth, engine: Engine, standin_app: Any, standin: MailcowStandin
) -> None:
    settings = worker_settings(mailcow_api_key="WRONG0-000000-000000-000000-000000")
    override_id = approved(client, auth, "example.org")
    worker = Worker(engine, settings, owner="w1", transports={"default": SwitchableTransport(standin_app)})
    try:
        for _ in range(5):
            await worker.tick()
    finally:
        await worker.aclose()
    assert [c["status"] for c in standin.calls] == [401]  # one failed login, not one per tick
    override = load(engine, override_id)
    assert override.state == S.approved and "auth" in (override.last_error or "")
    with transaction(engine) as session:
        target = session.get(MailcowTarget, "default")
        assert target is not None and target.paused_until is not None and target.paused_until > utcnow()
    assert 'tlso_target_paused{target="default"} 1.0' in scrape(client, auth)


# ---------------------------------------------------------------------------------------------------------------
# reconcile


async def test_reconcile_reports_drift_once_and_leaves_it_alone(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    gone = approved(client, auth, "gone.example")
    edited = approved(client, auth, "edited.example")
    await worker.tick()
    rows = mailcow_rows(standin)
    del standin.table.rows[rows["gone.example"]["id"]]
    standin.table.rows[rows["edited.example"]["id"]].policy = "none"
    standin.calls.clear()
    reconcile_now(engine)
    await worker.tick()
    assert (load(engine, gone).drift or {}).get("kind") == "missing"
    drift = load(engine, edited).drift
    assert drift is not None and drift["kind"] == "edited" and drift["fields"] == ["policy"]
    assert calls(standin, "add", "edit", "delete") == []  # alert only (the default)
    assert audit_after(engine, edited, "override.drift")[0]["drift"]["found"]["policy"] == "none"
    reconcile_now(engine)
    await worker.tick()
    assert audit_actions(engine, gone).count("override.drift") == 1  # reported once, not every interval
    # someone repairs the row by hand: the drift ends
    standin.table.rows[rows["edited.example"]["id"]].policy = "encrypt"
    reconcile_now(engine)
    await worker.tick()
    assert load(engine, edited).drift is None
    assert audit_actions(engine, edited)[-1] == "override.drift_resolved"
    assert 'tlso_overrides_drift{target="default"} 1.0' in scrape(client, auth)


@SQLITE_ONLY
async def test_reconcile_reapplies_when_configured(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, transport: SwitchableTransport
) -> None:
    settings = worker_settings(drift_action="reapply")
    gone = approved(client, auth, "gone.example")
    edited = approved(client, auth, "edited.example", parameters="protocols=>=TLSv1.2")
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    try:
        await worker.tick()
        rows = mailcow_rows(standin)
        del standin.table.rows[rows["gone.example"]["id"]]
        row = standin.table.rows[rows["edited.example"]["id"]]
        row.parameters, row.active = "", 0
        reconcile_now(engine)
        await worker.tick()
    finally:
        await worker.aclose()
    rows = mailcow_rows(standin)
    assert load(engine, gone).mailcow_id == rows["gone.example"]["id"] and load(engine, gone).drift is None
    assert (rows["edited.example"]["parameters"], rows["edited.example"]["active"]) == ("protocols=>=TLSv1.2", 1)
    for override_id in (gone, edited):
        assert audit_actions(engine, override_id)[-2:] == ["override.drift", "override.reapplied"]
        assert load(engine, override_id).lease_owner is None


@SQLITE_ONLY
async def test_a_recreated_row_is_taken_as_ours(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    old = mailcow_rows(standin)["example.org"]["id"]
    del standin.table.rows[old]
    new = standin.seed_row("example.org", "encrypt", "")["id"]
    reconcile_now(engine)
    await worker.tick()
    override = load(engine, override_id)
    assert override.mailcow_id == new != old and override.drift is None
    expire_now(engine, override_id)
    await worker.tick()
    assert standin.rows() == []


@SQLITE_ONLY
async def test_reconcile_never_touches_foreign_rows(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, transport: SwitchableTransport
) -> None:
    standin.seed_row("foreign.example", "none", "")
    standin.seed_row("[mx.other.example]:25", "may", "", active=0)
    override_id = approved(client, auth, "example.org")
    worker = Worker(engine, worker_settings(drift_action="reapply"), owner="w1", transports={"default": transport})
    try:
        await worker.tick()
        reconcile_now(engine)
        await worker.tick()
        ours = load(engine, override_id).mailcow_id
        expire_now(engine, override_id)
        await worker.tick()
    finally:
        await worker.aclose()
    assert sorted(mailcow_rows(standin)) == ["[mx.other.example]:25", "foreign.example"]
    assert calls(standin, "edit") == []
    assert [c["body"] for c in calls(standin, "delete")] == [f"[{ours}]"]
    with transaction(engine) as session:
        target = session.get(MailcowTarget, "default")
        assert target is not None and target.last_reconcile_at is not None
        assert (target.rows_owned, target.rows_foreign) == (1, 2)


# ---------------------------------------------------------------------------------------------------------------
# claims and metrics


def test_claims_are_exclusive_until_the_lease_runs_out(client: TestClient, auth: Auth, engine: Engine) -> None:
    ids = [approved(client, auth, f"d{n}.example") for n in range(4)]
    version = load(engine, ids[0]).version
    first = store.claim(engine, S.approved, "w1", lease_seconds=30, limit=3)
    second = store.claim(engine, S.approved, "w2", lease_seconds=30, limit=3)
    assert [job.id for job in first] == ids[:3] and [job.id for job in second] == ids[3:]
    assert store.claim(engine, S.approved, "w3", lease_seconds=30, limit=10) == []
    assert store.mark_add_sent(engine, [ids[0]], "w1", S.approved) == [ids[0]]
    assert store.mark_add_sent(engine, [ids[1]], "w2", S.approved) == []  # not w2's: nothing sent
    expire_lease(engine, ids[0])
    expire_lease(engine, ids[1])
    again = store.claim(engine, S.approved, "w3", lease_seconds=30, limit=10)
    assert [(job.id, job.first_attempt) for job in again] == [(ids[0], False), (ids[1], True)]
    assert load(engine, ids[0]).version == version  # a claim is bookkeeping: the ETag stays valid


class SlowTransport(SwitchableTransport):
    """A mailcow that takes `delay` seconds to answer each call."""

    delay = 0.0

    async def handle_async_request(self, request: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await super().handle_async_request(request)


async def test_leases_are_renewed_while_mailcow_is_slow(
    client: TestClient, auth: Auth, engine: Engine, settings: Settings, standin_app: Any
) -> None:
    override_id = approved(client, auth, "example.org")
    slow = SlowTransport(standin_app)
    slow.delay = 0.6  # list, add, list: about 1.8 s, three times the lease
    worker = Worker(
        engine, settings.model_copy(update={"worker_lease_seconds": 0.6}), owner="w1", transports={"default": slow}
    )
    try:
        ticking = asyncio.create_task(worker.tick())
        while load(engine, override_id).lease_owner != "w1":  # w1 holds it; from now on nobody else may
            await asyncio.sleep(0.02)
        stolen = []
        while not ticking.done():
            await asyncio.sleep(0.1)
            stolen += await asyncio.to_thread(store.claim, engine, S.approved, "w2", lease_seconds=30, limit=10)
        await ticking
    finally:
        await worker.aclose()
    assert stolen == []
    assert load(engine, override_id).state == S.active


async def test_the_reconcile_lease_is_renewed_while_mailcow_is_slow(
    engine: Engine, settings: Settings, standin_app: Any
) -> None:
    from app.targets.service import claim_reconcile

    slow = SlowTransport(standin_app)
    slow.delay = 1.8  # one list call, three times the lease
    quick = settings.model_copy(update={"worker_lease_seconds": 0.6})
    worker = Worker(engine, quick, owner="w1", transports={"default": slow})

    def holder() -> str | None:
        with Session(engine) as session:
            target = session.get(MailcowTarget, "default")
            return target.lease_owner if target else None

    try:
        ticking = asyncio.create_task(worker.tick())
        while holder() != "w1":  # w1 holds it; from now on nobody else may
            await asyncio.sleep(0.02)
        stolen: list[str] = []
        while not ticking.done():
            await asyncio.sleep(0.1)
            stolen += await asyncio.to_thread(claim_reconcile, engine, ["default"], "w2", timedelta(seconds=30))
        await ticking
    finally:
        await worker.aclose()
    assert stolen == []
    with Session(engine) as session:
        target = session.get(MailcowTarget, "default")
        assert target is not None and target.last_reconcile_at is not None and target.lease_owner is None


@SQLITE_ONLY
async def test_metrics_show_states_calls_and_reconcile(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker
) -> None:
    approved(client, auth, "example.org")
    await worker.tick()
    text = scrape(client, auth)
    assert 'tlso_overrides{state="active"} 1.0' in text
    assert 'tlso_mailcow_calls_total{op="add",outcome="ok",target="default"}' in text
    assert "tlso_mailcow_call_seconds_bucket" in text
    assert 'tlso_reconcile_last_success_timestamp_seconds{target="default"}' in text
    assert "tlso_worker_lag_seconds" in text and "tlso_database_up 1.0" in text
    assert "tlso_overrides_conflict 0.0" in text


# ---------------------------------------------------------------------------------------------------------------
# a worker killed at any point (in-process: the exception stands for SIGKILL — nothing after the point runs and
# open transactions roll back; real process kills are in tests/worker/test_faults.py)


class Killed(BaseException):
    pass


def kill_at(monkeypatch: Any, point: str) -> None:
    armed = [True]

    def crash(name: str) -> None:
        if armed[0] and name == point:
            armed[0] = False
            raise Killed(name)

    for module in (apply_module, remove_module, reconcile_module):
        monkeypatch.setattr(module, "crash_point", crash)


class Workers:
    """Start a worker; when one is killed, its leases run out and the next one takes over."""

    def __init__(self, engine: Engine, settings: Settings, transport: SwitchableTransport) -> None:
        self.engine, self.settings, self.transport = engine, settings, transport
        self.all: list[Worker] = []
        self.killed: list[str] = []
        self.current = self._new()

    def _new(self) -> Worker:
        worker = Worker(self.engine, self.settings, owner=f"w{len(self.all)}", transports={"default": self.transport})
        self.all.append(worker)
        return worker

    async def settle(self, ticks: int = 3) -> None:
        try:
            await settle(self.current, ticks)
        except Killed as killed:
            self.killed.append(str(killed))
            with transaction(self.engine) as session:
                session.execute(
                    sa.update(Override)
                    .where(Override.lease_owner == self.current.owner)  # type: ignore[arg-type]
                    .values(lease_until=utcnow() - timedelta(seconds=1), next_attempt_at=utcnow())
                )
            self.current = self._new()
            await settle(self.current, ticks)

    async def close(self) -> None:
        for worker in self.all:
            await worker.aclose()


@SQLITE_ONLY
@pytest.mark.parametrize(
    "point",
    ["after_claim", "after_add", "before_record_apply", "after_remove_claim", "after_delete", "before_record_removal"],
)
async def test_a_worker_killed_at_any_point_leaves_nothing_lost_or_doubled(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    transport: SwitchableTransport,
    settings: Settings,
    monkeypatch: Any,
    point: str,
) -> None:
    ids = [approved(client, auth, f"d{n}.example") for n in range(3)]
    kill_at(monkeypatch, point)
    workers = Workers(engine, settings, transport)
    try:
        await workers.settle()
        assert [load(engine, i).state for i in ids] == [S.active] * 3
        rows = mailcow_rows(standin)
        assert sorted(rows) == ["d0.example", "d1.example", "d2.example"]
        assert all(rows[load(engine, i).destination]["id"] == load(engine, i).mailcow_id for i in ids)
        expire_now(engine, *ids)
        await workers.settle()
    finally:
        await workers.close()
    assert workers.killed == [point]
    assert [load(engine, i).state for i in ids] == [S.expired] * 3
    assert standin.rows() == []
    for override_id in ids:
        actions = audit_actions(engine, override_id)
        assert actions.count("override.applied") == 1 and actions.count("override.removed") == 1


@SQLITE_ONLY
@pytest.mark.parametrize("point", ["after_replace_delete", "after_restore"])
async def test_a_kill_while_replacing_or_restoring_a_foreign_row_is_recovered(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    transport: SwitchableTransport,
    settings: Settings,
    monkeypatch: Any,
    point: str,
) -> None:
    standin.seed_row("example.org", "none", "")
    override_id = approved(client, auth, "example.org")
    workers = Workers(engine, settings, transport)
    try:
        await workers.settle(1)
        decided = client.post(
            f"/v1/overrides/{override_id}/resolve-conflict",
            json={**COMMENT, "action": "replace"},
            headers=auth(*ROOT_ADMIN),
        )
        assert decided.status_code == 200
        kill_at(monkeypatch, point)
        await workers.settle()
        assert load(engine, override_id).state == S.active
        assert mailcow_rows(standin)["example.org"]["policy"] == "encrypt"
        expire_now(engine, override_id)
        await workers.settle()
    finally:
        await workers.close()
    assert workers.killed == [point]
    override = load(engine, override_id)
    assert override.state == S.expired and override.conflict and override.conflict["status"] == "restored"
    assert [(r["dest"], r["policy"]) for r in standin.rows()] == [("example.org", "none")]


@SQLITE_ONLY
async def test_a_kill_after_a_reapply_is_recovered(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    transport: SwitchableTransport,
    monkeypatch: Any,
) -> None:
    override_id = approved(client, auth, "example.org")
    workers = Workers(engine, worker_settings(drift_action="reapply"), transport)
    try:
        await workers.settle(1)
        standin.table.rows.clear()
        kill_at(monkeypatch, "after_reapply")
        reconcile_now(engine)
        await workers.settle(1)
        assert workers.killed == ["after_reapply"]
        with transaction(engine) as session:  # the dead worker held the target's reconcile lease too
            session.execute(sa.update(MailcowTarget).values(lease_until=None, reconcile_due_at=utcnow()))
        await workers.settle(1)
    finally:
        await workers.close()
    override = load(engine, override_id)
    [row] = standin.rows()
    assert override.mailcow_id == row["id"] and override.drift is None  # the orphaned re-add became ours
    assert audit_actions(engine, override_id)[-2:] == ["override.drift", "override.drift"]  # missing, recreated


def test_the_crash_hook_is_refused_in_production(engine: Engine, monkeypatch: Any) -> None:
    from app.worker.faults import CRASH_ENV
    from app.worker.loop import run_worker

    monkeypatch.setenv(CRASH_ENV, "after_add")
    with pytest.raises(SystemExit, match="refused with TLSO_ENV=production"):
        run_worker(engine, worker_settings(env="production", oidc_issuer="https://idp.example.net/realms/mail"))


# ---------------------------------------------------------------------------------------------------------------
# edge cases: a replaced row that must come back, a late add, a human's identical row


def _replace(client: TestClient, auth: Auth, override_id: int) -> None:
    decided = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict",
        json={**COMMENT, "action": "replace"},
        headers=auth(*ROOT_ADMIN),
    )
    assert decided.status_code == 200, decided.text


@SQLITE_ONLY
async def test_an_apply_that_fails_after_replacing_puts_the_foreign_row_back(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, monkeypatch: Any
) -> None:
    standin.seed_row("example.org", "may", "")
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    _replace(client, auth, override_id)
    real_add = MailcowClient.add_policy

    async def refuse_ours(self: Any, dest: str, policy: str, parameters: str = "", *, active: bool = True) -> None:
        if policy == "encrypt":  # ours; the restore adds the original `may` row
            raise MailcowRejected("add: parameters invalid", msg_key="tls_policy_map_parameter_invalid")
        await real_add(self, dest, policy, parameters, active=active)

    monkeypatch.setattr(MailcowClient, "add_policy", refuse_ours)
    await settle(worker, 4)
    override = load(engine, override_id)
    assert (override.state, override.end_reason) == (S.failed, "apply_failed")
    assert override.conflict and override.conflict["status"] == "restored"
    assert [(r["dest"], r["policy"]) for r in standin.rows()] == [("example.org", "may")]
    assert audit_actions(engine, override_id)[-3:] == [
        "override.apply_failed",
        "override.conflict_restoring",
        "override.removed",
    ]


@SQLITE_ONLY
async def test_a_replaced_row_mailcow_cannot_take_back_is_reported_not_restored(
    client: TestClient, auth: Auth, engine: Engine, transport: SwitchableTransport, standin: MailcowStandin
) -> None:
    # mailcow's edit form stores `.sub.example.org`, its add refuses it: our add fails for good, and so
    # does putting the original back. The override says so instead of pretending.
    settings = worker_settings(mailcow_supports_subdomain_dest=True)
    client.app.state.settings = settings  # type: ignore[attr-defined]
    standin.seed_row(".sub.example.org", "may", "")
    override_id = approved(client, auth, ".sub.example.org")
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    try:
        await worker.tick()
        _replace(client, auth, override_id)
        await settle(worker, 4)
    finally:
        await worker.aclose()
    override = load(engine, override_id)
    assert (override.state, override.end_reason) == (S.failed, "apply_failed")
    assert override.conflict and override.conflict["status"] == "not_restored"
    assert "Policy destination is invalid" in override.conflict["reason"]
    assert standin.rows() == []


@SQLITE_ONLY
async def test_an_original_left_active_by_an_interrupted_restore_is_set_inactive_even_when_the_edit_fails_once(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.seed_row("example.org", "may", "", active=0)
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    _replace(client, auth, override_id)
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.active and override.mailcow_id is not None and override.conflict
    expire_now(engine, override_id)
    store.expire_due(engine, worker_settings(), 10)  # its removal starts; it runs below
    # An older version restored by adding the row active and then editing it; it died in between.
    del standin.table.rows[override.mailcow_id]
    standin.seed_row("example.org", "may", "", active=1)
    set_columns(engine, override_id, conflict={**override.conflict, "status": "restoring"})
    fault(standin, "edit", "http500", count=10)  # setting it inactive fails
    await worker.tick()
    assert load(engine, override_id).state == S.removing
    standin.clear_faults()
    await settle(worker)
    override = load(engine, override_id)
    assert override.state == S.expired and override.conflict and override.conflict["status"] == "restored"
    row = mailcow_rows(standin)["example.org"]
    assert (row["policy"], row["active"]) == ("may", 0)


@SQLITE_ONLY
async def test_an_inactive_original_is_restored_in_one_call_and_never_live(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    standin.seed_row("example.org", "may", "", active=0)
    override_id = approved(client, auth, "example.org")
    await worker.tick()
    _replace(client, auth, override_id)
    await worker.tick()
    expire_now(engine, override_id)
    standin.calls.clear()
    await worker.tick()
    assert load(engine, override_id).state == S.expired
    # Postfix reads the map per delivery: an original that was inactive must not apply for a moment either.
    restored = [state for state in standin.history("example.org") if state["policy"] == "may"]
    assert [(state["op"], state["active"]) for state in restored] == [("seed", 0), ("delete", 0), ("insert", 0)]
    assert [call["op"] for call in calls(standin, "add", "edit")] == ["add"]
    assert json.loads(calls(standin, "add")[0]["body"])["active"] == 0


@SQLITE_ONLY
async def test_a_human_row_identical_to_ours_is_a_conflict_when_we_never_sent_an_add(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin
) -> None:
    override_id = approved(client, auth, "example.org")
    fault(standin, "get", "http500", count=10)  # the first attempt cannot read the map: nothing is sent
    await worker.tick()
    standin.clear_faults()
    standin.seed_row("example.org", "encrypt", "")  # a human adds the very same row meanwhile
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and override.conflict and override.conflict["status"] == "open"
    assert calls(standin, "add") == []
    expire_now(engine, override_id)
    revoked = client.post(f"/v1/overrides/{override_id}/revoke", json=COMMENT, headers=auth(*ROOT_ADMIN))
    assert revoked.status_code == 200, revoked.text
    await settle(worker)
    assert [(r["dest"], r["policy"]) for r in standin.rows()] == [("example.org", "encrypt")]  # never touched
