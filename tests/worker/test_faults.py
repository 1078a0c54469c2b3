"""Real process kills and outages: `python -m app worker` as a subprocess against the stand-in (served
over HTTP by the test process) and a file / PostgreSQL database.

The worker SIGKILLs itself at a named point (`TLSO_WORKER_CRASH_AT`), a fresh one is started, and in the
end there must be exactly one mailcow row per live override, none for ended ones, no conflict mistaken
for our own row, and a valid audit chain.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.config import Settings
from app.core.db import make_engine
from app.overrides.models import OverrideState
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import COMMENT, load
from tests.private_postgres import PrivatePostgres
from tests.standin import ServedStandin, fault, mailcow_rows
from tests.worker.helpers import (
    WorkerProcess,
    approved,
    assert_chain_valid,
    audit_actions,
    audit_after,
    expire_now,
    seed_approved,
    states,
    wait_for,
    worker_env,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]

# The points where a kill leaves mailcow and the database disagreeing (a row in one, not the other). Each
# backend kills real processes at one apply and one removal point (a process start costs ~1.5 s); every
# point of app/worker/faults.py is also killed in-process, on each path, in tests/worker/test_jobs.py.
KILL_POINTS = {
    "sqlite": ("after_add", "before_record_removal"),
    "postgres": ("before_record_apply", "after_delete"),
}


@pytest.fixture
def settings(served_standin: ServedStandin) -> Settings:
    return worker_settings(mailcow_url=served_standin.url)


class Workers:
    def __init__(self, database_url: str, url: str, log_dir: Path, started: list[WorkerProcess]) -> None:
        self.database_url, self.url, self.log_dir, self.started = database_url, url, log_dir, started

    def start(self, **env: str) -> WorkerProcess:
        process = WorkerProcess(
            worker_env(self.database_url, self.url, TLSO_WORKER_LEASE_SECONDS="0.5", **env), self.log_dir
        )
        self.started.append(process)
        return process

    def killed_at(self, point: str) -> None:
        self.start(TLSO_WORKER_CRASH_AT=point).wait_killed()


@pytest.fixture
def workers(
    database_url: str, served_standin: ServedStandin, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> Workers:
    return Workers(database_url, served_standin.url, tmp_path, worker_processes)


def all_in(engine: Engine, ids: list[int], state: OverrideState) -> Callable[[], bool]:
    return lambda: set(states(engine, ids).values()) == {state}


def assert_one_row_each(engine: Engine, standin: MailcowStandin, ids: list[int]) -> None:
    rows = mailcow_rows(standin)
    assert len(rows) == len(ids)
    for override_id in ids:
        override = load(engine, override_id)
        assert override.state == S.active and override.conflict is None
        assert rows[override.destination]["id"] == override.mailcow_id
        assert rows[override.destination]["active"] == 1


def test_killed_at_every_dangerous_point_nothing_lost_nothing_doubled(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Workers, backend: str
) -> None:
    apply_point, remove_point = KILL_POINTS[backend]
    ids = [approved(client, auth, f"a{n}.example") for n in range(3)]
    workers.killed_at(apply_point)
    assert standin.rows(), "the kill came after mailcow added a row that nothing recorded"
    assert set(states(engine, ids).values()) == {S.approved}
    survivor = workers.start()
    wait_for(all_in(engine, ids, S.active), 20, "every override applied", survivor)
    survivor.stop()
    assert_one_row_each(engine, standin, ids)
    adopted = [after["adopted"] for i in ids for after in audit_after(engine, i, "override.applied")]
    assert len(adopted) == len(ids) and any(adopted)  # each applied once; the orphaned adds were adopted

    expire_now(engine, *ids)
    workers.killed_at(remove_point)
    assert len(standin.rows()) < len(ids), "the kill came after mailcow deleted rows that nothing recorded"
    assert set(states(engine, ids).values()) == {S.removing}
    survivor = workers.start()
    wait_for(all_in(engine, ids, S.expired), 20, "every override removed", survivor)
    survivor.stop()
    assert standin.rows() == []
    for override_id in ids:
        actions = audit_actions(engine, override_id)
        assert actions.count("override.applied") == 1 and actions.count("override.removed") == 1
    assert_chain_valid(engine)


def test_killed_after_deliver_the_release_is_asked_again_and_audited_once(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Workers
) -> None:
    """The queue pass's dangerous point: mailcow was asked to deliver an override's deferred mail, and the
    worker died before recording it. The next one asks again (harmless: a delivered id is gone from the queue)
    and audits `override.queue_released` once, counting what the dead worker asked for too."""
    tlsa = "TLSA lookup error for mx.example.org:25"
    flowing = standin.queue.fill("example.org", messages=3, reason=tlsa)  # the encrypt row lets these through
    staying = standin.queue.fill("example.org", messages=2, reason=tlsa, deliverable_under={"none"})
    override_id = approved(client, auth, "example.org")
    workers.killed_at("after_deliver")
    assert load(engine, override_id).state == S.active
    assert (load(engine, override_id).queue_release or {})["status"] == "releasing"
    assert "override.queue_released" not in audit_actions(engine, override_id)
    assert [m.queue_id for m in standin.queue.deferred("example.org")] == staying  # the others went out

    survivor = workers.start()
    wait_for(
        lambda: (load(engine, override_id).queue_release or {}).get("status") not in (None, "releasing"),
        20,
        "the release recorded",
        survivor,
    )
    survivor.stop()
    delivered = [qid for c in standin.queue.commands if c.action == "deliver" for qid in c.items]
    assert sorted(delivered) == sorted(flowing + staying + staying)  # asked again: only what was still there
    [released] = audit_after(engine, override_id, "override.queue_released")  # once: none lost, none doubled
    assert released["released"] == 5 and released["resumed"] is True
    record = load(engine, override_id).queue_release or {}
    assert record["released"] == 5 and "asking" not in record  # the ids were bookkeeping, not evidence
    assert_chain_valid(engine)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_mailcow_500s_empty_bodies_and_an_outage_are_waited_out(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    served_standin: ServedStandin,
    workers: Workers,
) -> None:
    first = [approved(client, auth, f"a{n}.example") for n in range(3)]
    fault(standin, "add", "http500", count=4)
    fault(standin, "add", "empty", count=2)
    fault(standin, "get", "empty", count=1)
    fault(standin, "add", "drop_after_commit", count=1)
    worker = workers.start()
    wait_for(all_in(engine, first, S.active), 20, "applied despite 500s and empty bodies", worker)
    assert_one_row_each(engine, standin, first)

    served_standin.stop()  # mailcow unreachable
    second = [approved(client, auth, f"b{n}.example") for n in range(2)]
    expire_now(engine, *first)
    time.sleep(0.6)  # several failed attempts
    assert set(states(engine, first).values()) == {S.removing}
    assert set(states(engine, second).values()) == {S.approved}
    assert "unavailable" in (load(engine, second[0]).last_error or "")
    served_standin.start()
    wait_for(all_in(engine, first, S.expired), 20, "removed after the outage", worker)
    wait_for(all_in(engine, second, S.active), 20, "applied after the outage", worker)
    assert sorted(mailcow_rows(standin)) == ["b0.example", "b1.example"]
    assert_chain_valid(engine)


def test_a_database_restart_is_waited_out(
    private_postgres: PrivatePostgres,
    standin: MailcowStandin,
    served_standin: ServedStandin,
    worker_processes: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """The server restarted is a private cluster (tests/private_postgres.py), never the shared one."""
    database_url = private_postgres.create_database(f"restart_{uuid.uuid4().hex[:10]}")
    engine = make_engine(database_url)  # its own: the conftest engine's pool would not survive the restart
    try:
        ids = seed_approved(engine, 30)
        workers = Workers(database_url, served_standin.url, tmp_path, worker_processes)
        worker = workers.start(TLSO_WORKER_BATCH_SIZE="3")
        wait_for(lambda: S.active in states(engine, ids).values(), 20, "the first applies", worker)
        _restart(private_postgres)  # mid-way: some applied, some in flight, some waiting
        wait_for(all_in(engine, ids, S.active), 60, "applied across a database restart", worker)
        assert_one_row_each(engine, standin, ids)
        expire_now(engine, *ids)
        wait_for(lambda: S.expired in states(engine, ids).values(), 20, "the first removals", worker)
        _restart(private_postgres)
        wait_for(all_in(engine, ids, S.expired), 60, "removed across a database restart", worker)
        assert standin.rows() == []
        assert_chain_valid(engine)
    finally:
        engine.dispose()


def _restart(cluster: PrivatePostgres) -> None:
    cluster.stop("fast")
    cluster.start()


@pytest.mark.parametrize("backend", ["postgres"])  # several workers
def test_a_rejected_key_is_not_retried_into_a_ban(
    client: TestClient,
    auth: Auth,
    engine: Engine,
    standin: MailcowStandin,
    workers: Workers,
) -> None:
    """mailcow bans an IP after 10 failed logins in 600 s: three workers with a wrong key stop after one
    failure each (the target is paused for all of them) instead of retrying every poll."""
    override_id = approved(client, auth, "example.org")
    started = [workers.start(TLSO_MAILCOW_API_KEY="WRONG-WRONG-WRONG", TLSO_WORKER_ID=f"w{n}") for n in range(3)]
    wait_for(lambda: "key" in (load(engine, override_id).last_error or ""), 20, "the key refused", started[0])
    time.sleep(3.0)  # 30 polls of each worker
    failures = len(standin.auth_failures)
    assert 1 <= failures <= 3, standin.auth_failures
    assert load(engine, override_id).state == S.approved and standin.rows() == []


def test_a_restart_with_the_corrected_key_removes_a_revoked_override_at_once(
    client: TestClient, auth: Auth, engine: Engine, standin: MailcowStandin, workers: Workers
) -> None:
    """The pause after a refused key lives in the database (so that a restart with the same wrong key does
    not hammer mailcow into a ban), but it is for that key: restarted with the corrected key, the worker
    removes the override revoked meanwhile at once, not after TLSO_MAILCOW_AUTH_BACKOFF_SECONDS (900 s)."""
    override_id = approved(client, auth, "example.org")
    worker = workers.start()
    wait_for(lambda: load(engine, override_id).state == S.active, 20, "the apply", worker)
    worker.stop()
    revoked = client.post(f"/v1/overrides/{override_id}/revoke", json=COMMENT, headers=auth("root", "admin"))
    assert revoked.status_code == 200, revoked.text

    wrong = workers.start(TLSO_MAILCOW_API_KEY="WRONG0-000000-000000-000000-000000")
    wait_for(lambda: len(standin.auth_failures) == 1, 20, "the key refused", wrong)
    time.sleep(1.0)  # ten polls: the pause holds it back
    wrong.stop()
    again = workers.start(TLSO_MAILCOW_API_KEY="WRONG0-000000-000000-000000-000000")  # the same wrong key
    time.sleep(2.0)
    again.stop()
    assert len(standin.auth_failures) == 1 and load(engine, override_id).state == S.removing
    assert list(mailcow_rows(standin)) == ["example.org"]

    fixed = workers.start()  # TLSO_MAILCOW_API_KEY corrected
    started = time.monotonic()
    wait_for(lambda: load(engine, override_id).state == S.revoked, 20, "the removal with the corrected key", fixed)
    assert time.monotonic() - started < 15  # the next poll, not the 900 s pause
    assert standin.rows() == [] and len(standin.auth_failures) == 1
    assert "the key configured here is another one" in fixed.output()
    assert_chain_valid(engine)
