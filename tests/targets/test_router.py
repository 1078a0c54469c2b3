"""`/v1/targets` and `/v1/targets/{name}/policies`: the live map with ownership and drift, read over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from app.core.config import Settings
from app.worker.loop import Worker
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import assert_problem
from tests.standin import KEY, fault, mailcow_rows, served
from tests.worker.helpers import BOB, approved, worker_settings

Auth = Callable[..., dict[str, str]]
AUDITOR = ("audrey", "auditor")
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


@pytest.fixture
def standin_url(standin_app: Starlette) -> Iterator[str]:
    with served(standin_app) as url:
        yield url


@pytest.fixture
def settings(standin_url: str) -> Settings:
    return worker_settings(
        mailcow_url=standin_url,
        mailcow_targets={"spare": {"url": ""}},  # named, but without a URL or key: not configured
    )


@pytest.fixture
async def worker(engine: Engine, settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(engine, settings, owner="w1")  # over real HTTP, like production
    yield worker
    await worker.aclose()


async def test_the_live_map_shows_owners_drift_missing_rows_and_conflicts(
    client: TestClient, auth: Auth, worker: Worker, standin: MailcowStandin
) -> None:
    standin.seed_row("foreign.example", "none", "")
    standin.seed_row("taken.example", "may", "")
    fine = approved(client, auth, "fine.example")
    edited = approved(client, auth, "edited.example")
    gone = approved(client, auth, "gone.example")
    blocked = approved(client, auth, "taken.example")
    await worker.tick()
    rows = mailcow_rows(standin)
    standin.table.rows[rows["edited.example"]["id"]].parameters = "protocols=>=TLSv1.3"
    del standin.table.rows[rows["gone.example"]["id"]]

    before = len(standin.calls)
    response = client.get("/v1/targets/default/policies", headers=auth(*AUDITOR))
    assert response.status_code == 200, response.text
    body = response.json()
    by_dest = {row["dest"]: row for row in body["rows"]}
    assert [row["dest"] for row in body["rows"]] == [
        "edited.example",
        "fine.example",
        "foreign.example",
        "taken.example",
    ]
    assert by_dest["fine.example"]["owned_by"] == fine and by_dest["fine.example"]["drift"] is None
    assert by_dest["fine.example"]["override_state"] == "active"
    assert by_dest["edited.example"]["owned_by"] == edited
    assert by_dest["edited.example"]["drift"]["kind"] == "edited"
    assert by_dest["edited.example"]["drift"]["fields"] == ["parameters"]
    assert by_dest["foreign.example"]["owned_by"] is None and by_dest["foreign.example"]["conflict_of"] is None
    assert by_dest["taken.example"]["owned_by"] is None and by_dest["taken.example"]["conflict_of"] == blocked
    assert [(m["override_id"], m["drift"]["kind"]) for m in body["missing"]] == [(gone, "missing")]
    assert body["target"]["name"] == "default" and body["target"]["configured"] is True
    assert body["target"]["rows_foreign"] == 2  # as of the worker's first reconcile
    assert KEY not in response.text
    # reading never changes anything: every call it made was a read
    made = [call["op"] for call in standin.calls[before:]]
    assert made and set(made) == {"get"}


@SQLITE_ONLY
def test_reading_the_map_needs_a_reviewer_admin_or_auditor_role(client: TestClient, auth: Auth) -> None:
    assert_problem(client.get("/v1/targets/default/policies"), 401)
    assert_problem(client.get("/v1/targets/default/policies", headers=auth("alice", "requester")), 403)
    assert client.get("/v1/targets/default/policies", headers=auth(*BOB)).status_code == 200
    assert client.get("/v1/targets/default/policies", headers=auth("root", "admin")).status_code == 200


@SQLITE_ONLY
def test_unknown_and_unconfigured_targets(client: TestClient, auth: Auth) -> None:
    assert_problem(client.get("/v1/targets/nowhere/policies", headers=auth(*AUDITOR)), 404)
    assert_problem(client.get("/v1/targets/spare/policies", headers=auth(*AUDITOR)), 503)
    listed = client.get("/v1/targets", headers=auth(*AUDITOR)).json()
    assert [(t["name"], t["configured"]) for t in listed] == [("default", True), ("spare", False)]
    assert KEY not in str(listed)


@SQLITE_ONLY
def test_mailcow_trouble_is_a_503(client: TestClient, auth: Auth, standin: MailcowStandin) -> None:
    fault(standin, "get", "http500", count=1)
    problem = assert_problem(client.get("/v1/targets/default/policies", headers=auth(*AUDITOR)), 503)
    assert "unavailable" in problem["detail"]
    assert client.get("/v1/targets/default/policies", headers=auth(*AUDITOR)).status_code == 200


@SQLITE_ONLY
def test_a_rejected_key_pauses_calls_from_the_api_too(
    client: TestClient, auth: Auth, standin: MailcowStandin, app: Any, standin_url: str
) -> None:
    app.state.settings = worker_settings(mailcow_url=standin_url, mailcow_api_key="WRONG0-000000-000000-000000-0000")
    for _ in range(3):
        problem = assert_problem(client.get("/v1/targets/default/policies", headers=auth(*AUDITOR)), 503)
    assert "paused" in problem["detail"]
    assert [call["status"] for call in standin.calls] == [401]  # one failed login, then no more calls
    listed = client.get("/v1/targets", headers=auth(*AUDITOR)).json()
    assert listed[0]["paused_until"] is not None


@SQLITE_ONLY
async def test_targets_list_shows_the_last_reconcile(client: TestClient, auth: Auth, worker: Worker) -> None:
    assert client.get("/v1/targets", headers=auth(*AUDITOR)).json()[0]["last_reconcile_at"] is None
    await worker.tick()
    target = client.get("/v1/targets", headers=auth(*AUDITOR)).json()[0]
    assert target["last_reconcile_at"] is not None and target["last_reconcile_error"] is None
    assert target["url"].startswith("http://127.0.0.1:")
