"""Real races on PostgreSQL through a real server: many reviewers or requesters at the same instant."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from tests.helpers import PROBLEM_JSON, VALID_REQUEST, LiveServer, audit_rows, counts

RACERS = 20


@pytest.fixture(autouse=True)
def _postgres_only(backend: str) -> None:
    if backend != "postgres":
        pytest.skip("SQLite has a single writer; the races that matter are PostgreSQL's")


def _race(server: LiveServer, calls: list[tuple[str, str, dict[str, str], dict[str, Any]]]) -> list[httpx.Response]:
    """Send every call at the same moment, one thread and one connection each."""
    start = threading.Barrier(len(calls))

    def send(call: tuple[str, str, dict[str, str], dict[str, Any]]) -> httpx.Response:
        method, path, headers, body = call
        with httpx.Client(base_url=server.url, timeout=60) as http:
            http.get("/healthz")  # connect first, so the race is about the requests, not the handshakes
            start.wait()
            return http.request(method, path, headers=headers, json=body)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, calls))


def _verify(server: LiveServer, headers: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{server.url}/v1/audit/verify", headers=headers, timeout=30).json()
    return result


def _create(server: LiveServer, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/overrides", json={**VALID_REQUEST, **fields}, headers=headers, timeout=30)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _by_status(responses: list[httpx.Response]) -> dict[int, list[httpx.Response]]:
    grouped: dict[int, list[httpx.Response]] = {}
    for response in responses:
        grouped.setdefault(response.status_code, []).append(response)
    return grouped


def test_many_approvals_of_a_one_approval_request(
    live_server: LiveServer, engine: Engine, auth: Callable[..., dict[str, str]]
) -> None:
    created = _create(live_server, auth("alice", "requester"))
    calls = [
        ("POST", f"/v1/overrides/{created['id']}/approve", auth(f"reviewer{n}", "approver"), {"comment": "ok"})
        for n in range(RACERS)
    ]
    grouped = _by_status(_race(live_server, calls))
    assert sorted(grouped) == [200, 409], {k: v[0].text for k, v in grouped.items()}
    [winner] = grouped[200]
    assert winner.json()["state"] == "approved" and winner.json()["version"] == 2
    assert len(grouped[409]) == RACERS - 1
    assert all(r.headers["content-type"].startswith(PROBLEM_JSON) for r in grouped[409])
    assert len(audit_rows(engine, "override.approved")) == 1
    assert counts(engine)["vote"] == 1
    assert _verify(live_server, auth("erin", "auditor"))["valid"] is True


def test_many_approvals_of_a_two_approval_request(
    live_server: LiveServer, engine: Engine, auth: Callable[..., dict[str, str]]
) -> None:
    created = _create(live_server, auth("alice", "requester"), policy="none")
    calls = [
        ("POST", f"/v1/overrides/{created['id']}/approve", auth(f"reviewer{n}", "approver"), {"comment": "ok"})
        for n in range(RACERS)
    ]
    grouped = _by_status(_race(live_server, calls))
    assert sorted(grouped) == [200, 409], {k: v[0].text for k, v in grouped.items()}
    assert sorted(r.json()["state"] for r in grouped[200]) == ["approved", "pending"]
    assert len(grouped[409]) == RACERS - 2
    assert counts(engine)["vote"] == 2
    assert len(audit_rows(engine, "override.approval_recorded")) == 1
    assert len(audit_rows(engine, "override.approved")) == 1
    final = httpx.get(f"{live_server.url}/v1/overrides/{created['id']}", headers=auth("bob", "approver")).json()
    assert final["state"] == "approved" and len(final["approvals"]) == 2 and final["version"] == 3
    verified = _verify(live_server, auth("erin", "auditor"))
    assert verified["valid"] is True and verified["checked"] == 1 + 2 * 2


def test_concurrent_creates_for_one_destination(
    live_server: LiveServer, engine: Engine, auth: Callable[..., dict[str, str]]
) -> None:
    calls = [("POST", "/v1/overrides", auth(f"engineer{n}", "requester"), VALID_REQUEST) for n in range(RACERS)]
    grouped = _by_status(_race(live_server, calls))
    assert sorted(grouped) == [201, 409], {k: v[0].text for k, v in grouped.items()}
    [winner] = grouped[201]
    assert len(grouped[409]) == RACERS - 1
    assert {r.json()["existing"] for r in grouped[409]} == {f"/v1/overrides/{winner.json()['id']}"}
    assert counts(engine)["override"] == 1
    assert len(audit_rows(engine, "override.created")) == 1
    assert _verify(live_server, auth("erin", "auditor"))["valid"] is True


def test_concurrent_creates_with_one_idempotency_key(
    live_server: LiveServer, engine: Engine, auth: Callable[..., dict[str, str]]
) -> None:
    headers = auth("alice", "requester") | {"Idempotency-Key": "submit-once"}
    responses = _race(live_server, [("POST", "/v1/overrides", headers, VALID_REQUEST)] * RACERS)
    assert {r.status_code for r in responses} == {201}, {r.status_code: r.text for r in responses}
    assert len({r.text for r in responses}) == 1  # every caller got the very same answer
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert counts(engine)["override"] == 1 and counts(engine)["idempotency_record"] == 1
    assert len(audit_rows(engine, "override.created")) == 1
