"""A refused API key pauses a target (mailcow bans an IP after 10 failed logins in 10 minutes), but a
revoke must not wait behind a key problem: the pause is for the refused key only (a corrected key ends
it), an admin can end it (`POST /v1/targets/{name}/resume`), and the jobs that waited run at once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.applications import Starlette

from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.mailcow.targets import configured_targets
from app.overrides.models import OverrideState
from app.targets.models import MailcowTarget
from app.worker.loop import Worker
from devtools.mailcow_standin import MailcowStandin, StandinKey
from tests.helpers import COMMENT, assert_problem, load
from tests.standin import KEY, mailcow_rows, served
from tests.worker.helpers import (
    ROOT_ADMIN,
    approved,
    audit_actions,
    set_columns,
    settle,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]
WRONG = "WRONG0-000000-000000-000000-000000"
OTHER_WRONG = "WRONG1-111111-111111-111111-111111"


@pytest.fixture
def standin_url(standin_app: Starlette) -> Iterator[str]:
    with served(standin_app) as url:
        yield url


@pytest.fixture
def settings(standin_url: str) -> Settings:
    return worker_settings(mailcow_url=standin_url)  # the API process reads the same mailcow over HTTP


# Whatever a test does, the audit chain it leaves verifies (tests/worker/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_stays_valid")


@pytest.fixture
async def workers(engine: Engine, settings: Settings) -> AsyncIterator[Callable[..., Worker]]:
    """Workers over real HTTP, each with the API key it is given (a restart with another key: a new one)."""
    started: list[Worker] = []

    def start(key: str = KEY, owner: str = "w1") -> Worker:
        worker = Worker(engine, worker_settings(mailcow_url=settings.mailcow_url, mailcow_api_key=key), owner=owner)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.aclose()


def target_row(engine: Engine) -> MailcowTarget:
    with Session(engine) as session:
        row = session.get(MailcowTarget, "default")
        assert row is not None
        return row


def revoke(client: TestClient, auth: Auth, override_id: int) -> None:
    revoked = client.post(f"/v1/overrides/{override_id}/revoke", json=COMMENT, headers=auth(*ROOT_ADMIN))
    assert revoked.status_code == 200, revoked.text


def resume(client: TestClient, auth: Auth, *who: str, comment: str = "the key's allowed IPs are fixed") -> Any:
    return client.post("/v1/targets/default/resume", json={"comment": comment}, headers=auth(*(who or ROOT_ADMIN)))


async def test_a_corrected_key_ends_the_pause_and_the_revoked_overrides_removal_runs_at_once(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Callable[..., Worker]
) -> None:
    override_id = approved(client, auth, "example.org")
    await workers().tick()
    assert load(engine, override_id).state == S.active
    # The key is changed to a wrong one; an admin revokes the override.
    revoke(client, auth, override_id)
    wrong = workers(WRONG)
    await settle(wrong, 5)
    assert len(standin.auth_failures) == 1  # one failed login, then the target is paused for that key
    assert load(engine, override_id).state == S.removing and list(mailcow_rows(standin)) == ["example.org"]
    row = target_row(engine)
    assert row.paused_until is not None and row.paused_until > utcnow() + timedelta(seconds=800)
    assert row.refused_keys and KEY not in row.refused_keys and WRONG not in row.refused_keys
    listed = client.get("/v1/targets", headers=auth(*ROOT_ADMIN)).json()[0]
    assert listed["paused_until"] is None  # the API process's key (the right one) is not the refused one
    # The removal waits for the pause only: it is due, not backed off by its own 900 s.
    assert load(engine, override_id).next_attempt_at <= utcnow()  # type: ignore[operator]

    await workers(KEY, "w2").tick()  # restarted with the corrected key: one tick, removals first
    assert load(engine, override_id).state == S.revoked
    assert standin.rows() == [] and len(standin.auth_failures) == 1
    assert audit_actions(engine, override_id)[-1] == "override.removed"


async def test_the_pause_holds_for_each_refused_key_so_a_rolling_restart_never_loops_into_a_ban(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Callable[..., Worker]
) -> None:
    ids = [approved(client, auth, f"a{n}.example") for n in range(2)]
    old, other_old, new = workers(WRONG, "old"), workers(OTHER_WRONG, "old2"), workers(KEY, "new")
    for _ in range(10):
        for worker in (old, other_old, new):
            await worker.tick()
    assert {load(engine, override_id).state for override_id in ids} == {S.active}
    # each refused key failed once; then its own pause held it back, whatever the others did meanwhile
    assert len(standin.auth_failures) <= 2 and not standin.banned("127.0.0.1")
    assert len((target_row(engine).refused_keys or "").split()) == len(standin.auth_failures)
    paused = [e for e in _events(engine) if e["action"] == "target.paused"]
    assert len(paused) == len(standin.auth_failures)  # audited once per pause and key, not per tick


async def test_a_job_refused_mid_batch_waits_for_the_pause_and_not_a_second_longer(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Callable[..., Worker]
) -> None:
    override_id = approved(client, auth, "example.org")
    wrong = workers(WRONG)
    await wrong.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and "auth" in (override.last_error or "")
    pause_end = target_row(engine).paused_until
    assert pause_end is not None
    assert override.next_attempt_at is not None and override.next_attempt_at <= pause_end
    # the pause runs out: the job is due at once (the worker wakes then), with the same key
    with transaction(engine) as session:
        session.execute(sa.update(MailcowTarget).values(paused_until=utcnow() - timedelta(seconds=1)))
    standin.set_key(StandinKey(WRONG))  # meanwhile the wrong key was made valid in mailcow
    result = await wrong.tick()
    assert load(engine, override_id).state == S.active and result.did_work


# ---------------------------------------------------------------------------------------------------------------
# POST /v1/targets/{name}/resume


async def test_an_admin_resumes_a_paused_target_and_every_waiting_job_is_due_at_once(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Callable[..., Worker]
) -> None:
    waiting, in_flight = approved(client, auth, "a.example"), approved(client, auth, "b.example")
    wrong = workers(WRONG)
    await wrong.tick()
    assert len(standin.auth_failures) == 1
    later = utcnow() + timedelta(hours=1)
    set_columns(engine, waiting, next_attempt_at=later)  # e.g. backed off by an older version
    set_columns(engine, in_flight, next_attempt_at=later, lease_owner="w9", lease_until=later)
    listed = client.get("/v1/targets", headers=auth(*ROOT_ADMIN)).json()[0]
    assert listed["paused_until"] is None  # the API's key is not the refused one

    resumed = resume(client, auth)
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused_until"] is None and resumed.json()["name"] == "default"
    row = target_row(engine)
    assert (row.paused_until, row.pause_reason, row.refused_keys) == (None, None, None)
    assert load(engine, waiting).next_attempt_at <= utcnow()  # type: ignore[operator]
    assert load(engine, in_flight).next_attempt_at == later  # leased: another worker has it in hand
    event = [e for e in _events(engine) if e["action"] == "target.resumed"][-1]
    assert event["actor"] == "root" and event["comment"] == "the key's allowed IPs are fixed"
    assert event["after"] == {"target": "default", "jobs_due_now": 1} and event["before"]["paused_until"]
    assert_problem(resume(client, auth), 409)  # not paused any more: nothing changes

    standin.set_key(StandinKey(WRONG))  # what the admin fixed in mailcow
    await wrong.tick()
    assert load(engine, waiting).state == S.active and len(standin.auth_failures) == 1


async def test_resume_is_for_admins_and_answers_problems(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Callable[..., Worker]
) -> None:
    approved(client, auth, "a.example")
    await workers(WRONG).tick()
    until = target_row(engine).paused_until
    assert_problem(client.post("/v1/targets/default/resume", json=COMMENT), 401)
    for who in (("bob", "approver"), ("audrey", "auditor"), ("alice", "requester")):
        assert_problem(resume(client, auth, *who), 403)
    refusals = [e for e in _events(engine) if e["action"] == "auth.refused"]
    assert [e["actor"] for e in refusals] == ["bob", "audrey", "alice"]
    assert_problem(resume(client, auth, comment="  "), 422, field="body.comment")
    assert_problem(client.post("/v1/targets/default/resume", json={}, headers=auth(*ROOT_ADMIN)), 422)
    assert_problem(resume_named(client, auth, "nowhere"), 404)
    assert target_row(engine).paused_until == until  # nothing of that changed anything
    assert "target.resumed" not in [e["action"] for e in _events(engine)]
    assert resume(client, auth).status_code == 200


def test_resume_is_in_the_openapi_document(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/targets/{name}/resume"]["post"]
    assert {"401", "403", "404", "409", "422"} <= set(operation["responses"])
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ActionBody")


def test_a_fingerprint_tells_keys_apart_and_is_not_the_key(settings: Settings) -> None:
    right = configured_targets(settings)["default"]
    wrong = configured_targets(worker_settings(mailcow_url=settings.mailcow_url, mailcow_api_key=WRONG))["default"]
    first, second = right.key_fingerprint(), right.key_fingerprint()
    assert first != second  # salted: equal keys do not give equal fingerprints
    assert right.holds_key(first) and right.holds_key(second) and not wrong.holds_key(first)
    assert KEY not in first and KEY.replace("-", "") not in first and "$" in first
    assert not right.holds_key(KEY) and not right.holds_key("scrypt$$") and not right.holds_key("scrypt$!$!")


def resume_named(client: TestClient, auth: Auth, name: str) -> Any:
    return client.post(f"/v1/targets/{name}/resume", json=COMMENT, headers=auth(*ROOT_ADMIN))


def _events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT actor, action, before, after, comment FROM audit_event ORDER BY seq"))
        return [
            {
                "actor": row[0],
                "action": row[1],
                "before": _json(row[2]),
                "after": _json(row[3]),
                "comment": row[4],
            }
            for row in rows
        ]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
