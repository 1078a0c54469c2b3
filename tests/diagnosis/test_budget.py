"""The diagnosis budget and the recent diagnoses live in the database: every replica of the API shares
them. In-process first (two limiters and two caches on one database, both backends), then for real: two
`python -m app serve` processes on one PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from app.core.devidp import DEV_AUDIENCE, DevIdentityProvider, DevTokenRequest
from app.core.errors import TooManyRequests
from app.diagnosis.budget import DiagnosisCall, RateLimiter, RecentDiagnoses
from app.diagnosis.models import Diagnosis
from tests.helpers import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    now = [datetime(2026, 12, 7, 12, 0, tzinfo=UTC)]
    monkeypatch.setattr("app.diagnosis.budget.utcnow", lambda: now[0])
    return now


def _calls(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(DiagnosisCall)).scalar_one())


def test_two_limiters_on_one_database_keep_one_budget(engine: Engine, clock: list[datetime]) -> None:
    one, other = RateLimiter(engine, per_minute=2), RateLimiter(engine, per_minute=2)
    one.check("actor:alice")
    other.check("actor:alice")
    with pytest.raises(TooManyRequests) as refused:
        one.check("actor:alice")  # the other process took the second call of this window
    assert refused.value.headers == {"Retry-After": "61"}
    other.check("actor:bob")  # every caller has a budget of their own
    clock[0] += timedelta(seconds=30)
    with pytest.raises(TooManyRequests) as refused:
        other.check("actor:alice")
    assert refused.value.headers == {"Retry-After": "31"}
    clock[0] += timedelta(seconds=RateLimiter.WINDOW)
    one.check("actor:alice")  # the window moved on


def test_expired_calls_are_cleared(engine: Engine, clock: list[datetime]) -> None:
    limiter = RateLimiter(engine, per_minute=2)
    for i in range(50):
        limiter.check(f"caller{i}")
    assert _calls(engine) == 50
    clock[0] += timedelta(seconds=RateLimiter.WINDOW + 1)
    limiter._next_sweep = 0.0  # a window has passed for this process too
    limiter.check("late")
    assert _calls(engine) == 1  # the callers who did not come back left nothing behind


def _diagnosis(domain: str) -> Diagnosis:
    return Diagnosis.model_validate(
        {
            "domain": domain,
            "verdict": "blocked",
            "failure_class": "A",
            "recommended": None,
            "explanation": "TLSA records match no certificate.",
            "resolver": "127.0.0.1:53",
            "resolver_validates": True,
            "smtp_port": 25,
            "mx": None,
            "hosts": [],
            "checked_at": "2026-12-07T12:00:00Z",
            "duration_ms": 12,
        }
    )


def test_a_diagnosis_stored_by_one_process_serves_another(engine: Engine, clock: list[datetime]) -> None:
    one, other = RecentDiagnoses(engine), RecentDiagnoses(engine)
    assert other.get("stale.example") is None
    one.put("stale.example", _diagnosis("stale.example"))
    found = other.get("stale.example")
    assert found is not None and found.failure_class == "A" and found.domain == "stale.example"
    other.put("stale.example", _diagnosis("stale.example"))  # a later one replaces it
    clock[0] += timedelta(seconds=121)
    assert one.get("stale.example") is None  # two minutes old: probe again
    one.put("other.example", _diagnosis("other.example"))
    with engine.connect() as conn:  # the expired one was cleared on the way
        assert conn.execute(sa.text("SELECT domain FROM recent_diagnosis")).scalars().all() == ["other.example"]


# ---------------------------------------------------------------------------------------------------------------
# Two real API processes


@pytest.fixture
def issuer() -> Iterator[tuple[str, DevIdentityProvider]]:
    """An OpenID issuer (discovery + JWKS) over real HTTP, for processes outside this one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/dev"
    idp = DevIdentityProvider(url)
    app = FastAPI()
    app.include_router(idp.router())
    with LiveServer(app, port=port, lifespan="off"):
        yield url, idp


def _serve(database_url: str, issuer_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSO_", "PROMETHEUS_"))}
    env.update(
        {
            "TLSO_ENV": "test",
            "TLSO_DATABASE_URL": database_url,
            "TLSO_OIDC_ISSUER": issuer_url,
            "TLSO_OIDC_AUDIENCE": DEV_AUDIENCE,
            "TLSO_OIDC_ALGORITHMS": "ES256",
            "TLSO_OIDC_ROLES_CLAIM": "roles",
            "TLSO_OIDC_ROLE_MAP": '{"requester": ["requester"], "approver": ["approver"]}',
            "TLSO_DIAGNOSIS_RATE_PER_MINUTE": "2",
            "TLSO_DIAGNOSIS_ON_CREATE": "true",
            "TLSO_DIAGNOSIS_ALLOW_RESERVED": "true",
            "TLSO_DNS_RESOLVER": "127.0.0.1:9",  # nothing answers: each diagnosis ends quickly, "unknown"
            "TLSO_DIAGNOSIS_TIMEOUT_SECONDS": "0.5",
        }
    )
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise AssertionError(f"the API exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the API did not become ready:\n{log.read_text()}")


def test_two_api_processes_keep_one_budget_and_share_recent_diagnoses(
    backend: str, database_url: str, issuer: tuple[str, DevIdentityProvider], tmp_path: Path
) -> None:
    if backend != "postgres":
        pytest.skip("replicas share PostgreSQL (SQLite runs one embedded API)")
    issuer_url, idp = issuer
    alice = {"authorization": "Bearer " + idp.mint(DevTokenRequest(sub="alice", roles=["requester"]))}
    processes = [_serve(database_url, issuer_url, tmp_path / f"api{i}.log") for i in (1, 2)]
    try:
        for i, (process, url) in enumerate(processes, 1):
            _wait_ready(url, process, tmp_path / f"api{i}.log")
        (_, first), (_, second) = processes
        with httpx.Client(timeout=30) as http:
            # The recent-diagnosis cache: a request on one replica diagnoses the domain; the same domain asked
            # for on the other replica reuses that diagnosis (same checked_at) and spends no budget.
            body = {
                "destination": "stale.example.test",
                "policy": "encrypt",
                "justification": "TLSA records stale since the renewal, OPS-1",
            }
            created = http.post(first + "/v1/overrides", json=body, headers=alice)
            assert created.status_code == 201, created.text
            diagnosis = created.json()["diagnosis"]
            assert diagnosis is not None and "checked_at" in diagnosis, diagnosis
            cancelled = http.post(
                f"{first}/v1/overrides/{created.json()['id']}/cancel", json={"comment": "again"}, headers=alice
            )
            assert cancelled.status_code == 200, cancelled.text
            again = http.post(second + "/v1/overrides", json=body, headers=alice)
            assert again.status_code == 201, again.text
            assert again.json()["diagnosis"] == diagnosis
            # The budget (2 a minute): one call spent above, one more on the second replica, and the first
            # replica then says no, although it has itself diagnosed only once.
            assert http.get(second + "/v1/diagnostics/good.example.test", headers=alice).status_code == 200
            refused = http.get(first + "/v1/diagnostics/other.example.test", headers=alice)
            assert refused.status_code == 429, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert int(refused.headers["retry-after"]) >= 1
            assert http.get(second + "/v1/diagnostics/other.example.test", headers=alice).status_code == 429
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            process.wait(20)
