"""Helpers for the worker tests (imported by name; the fixtures are in tests/worker/conftest.py): overrides
in a given state the way production gets there, time travel, audit reads, worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from app.audit.service import record, verify_chain
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.overrides.models import Override, OverrideState
from app.worker.loop import Worker
from tests.helpers import COMMENT, audit_keys, make_settings
from tests.standin import BASE, KEY

ROOT = Path(__file__).resolve().parents[2]
S = OverrideState
ALICE = ("alice", "requester")
BOB = ("bob", "approver")
ROOT_ADMIN = ("root", "admin")


def worker_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mailcow_url": BASE,
        "mailcow_api_key": KEY,
        "retry_initial_seconds": 0.0,  # a failed attempt is due again at once: tests step with tick()
        "retry_max_seconds": 0.0,
        "mailcow_retry_backoff_seconds": 0.001,
        "worker_lease_seconds": 30.0,
        "reconcile_interval_seconds": 3600.0,
        "removal_grace_seconds": 300.0,
        "worker_poll_seconds": 0.2,
    }
    values.update(overrides)
    return make_settings(**values)


class SwitchableTransport(httpx.AsyncBaseTransport):
    """The stand-in over ASGI, with a switch that makes mailcow unreachable (connection refused)."""

    def __init__(self, app: Starlette) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


# ---------------------------------------------------------------------------------------------------------------
# Overrides in a given state, the way production gets there


def approved(client: Any, auth: Callable[..., dict[str, str]], destination: str, **fields: Any) -> int:
    """alice asks, bob approves: an approved override, due for the worker now."""
    body = {
        "destination": destination,
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale after a certificate renewal.",
        "duration": "P3D",
        **fields,
    }
    created = client.post("/v1/overrides", json=body, headers=auth(*ALICE))
    assert created.status_code == 201, created.text
    override_id = int(created.json()["id"])
    decided = client.post(f"/v1/overrides/{override_id}/approve", json=COMMENT, headers=auth(*BOB))
    assert decided.status_code == 200, decided.text
    assert decided.json()["state"] == "approved"
    return override_id


def seed_approved(engine: Engine, count: int, prefix: str = "d", policy: str = "encrypt") -> list[int]:
    """Many approved overrides straight into the database (with their audit rows), for load tests."""
    ids = []
    with transaction(engine) as session:
        now = utcnow()
        for n in range(count):
            override = Override(
                target="default",
                destination=f"{prefix}{n}.example",
                policy=policy,
                parameters="",
                justification="seeded for a worker test",
                duration_seconds=3600,
                state=S.approved,
                requested_by="alice",
                requested_by_key="alice",
                requested_by_name="Alice",
                created_at=now,
                updated_at=now,
                next_attempt_at=now,
                approvals_required=1,
            )
            session.add(override)
            session.flush()
            ids.append(override.id or 0)
            record(session, actor="seed", action="override.approved", override_id=override.id, after={"n": n})
    return ids


def states(engine: Engine, ids: list[int]) -> dict[int, OverrideState]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, state FROM override")).all()
    wanted = set(ids)
    return {int(row[0]): OverrideState(row[1]) for row in rows if row[0] in wanted}


def set_columns(engine: Engine, override_id: int, **values: Any) -> None:
    """Time travel and crash simulation: write bookkeeping columns directly."""
    with transaction(engine) as session:
        session.execute(sa.update(Override).where(Override.id == override_id).values(**values))  # type: ignore[arg-type]


def expire_now(engine: Engine, *ids: int) -> None:
    for override_id in ids:
        set_columns(engine, override_id, expires_at=utcnow() - timedelta(seconds=1))


def expire_lease(engine: Engine, override_id: int) -> None:
    past = utcnow() - timedelta(seconds=1)
    set_columns(engine, override_id, lease_until=past, next_attempt_at=past)


def reconcile_now(engine: Engine, target: str = "default") -> None:
    from app.targets.models import MailcowTarget

    with transaction(engine) as session:
        session.execute(
            sa.update(MailcowTarget)
            .where(MailcowTarget.name == target)  # type: ignore[arg-type]
            .values(reconcile_due_at=utcnow() - timedelta(seconds=1))
        )


def audit_actions(engine: Engine, override_id: int) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT action FROM audit_event WHERE override_id = :id ORDER BY seq"), {"id": override_id}
        ).all()
    return [row[0] for row in rows]


def audit_after(engine: Engine, override_id: int, action: str) -> list[dict[str, Any]]:
    from sqlmodel import Session, col, select

    from app.audit.models import AuditEvent

    with Session(engine) as session:
        rows = session.exec(
            select(AuditEvent)
            .where(AuditEvent.override_id == override_id, AuditEvent.action == action)
            .order_by(col(AuditEvent.seq))
        ).all()
        return [dict(row.after or {}) for row in rows]


def assert_chain_valid(engine: Engine) -> None:
    from sqlmodel import Session

    with Session(engine) as session:
        result = verify_chain(session, audit_keys())
    assert result.valid, result


async def settle(worker: Worker, ticks: int = 3) -> None:
    for _ in range(ticks):
        await worker.tick()


# ---------------------------------------------------------------------------------------------------------------
# Real processes: `python -m app worker` against a stand-in served by the test process


def worker_env(database_url: str, mailcow_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TLSO_")}
    env.update(
        {
            "TLSO_ENV": "test",
            "TLSO_DATABASE_URL": database_url,
            "TLSO_MAILCOW_URL": mailcow_url,
            "TLSO_MAILCOW_API_KEY": KEY,
            "TLSO_LOG_JSON": "false",
            "TLSO_LOG_LEVEL": "WARNING",
            "TLSO_WORKER_POLL_SECONDS": "0.1",
            "TLSO_WORKER_LEASE_SECONDS": "1.5",
            "TLSO_RETRY_INITIAL_SECONDS": "0.05",
            "TLSO_RETRY_MAX_SECONDS": "0.3",
            "TLSO_MAILCOW_RETRY_BACKOFF_SECONDS": "0.01",
            "TLSO_MAILCOW_TIMEOUT_SECONDS": "2",
            "TLSO_RECONCILE_INTERVAL_SECONDS": "3600",
            "TLSO_REMEDIATION": "off",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """`python -m app worker` in a subprocess (stderr kept in a file for post-mortems)."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "worker") -> None:
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        # The child writes to the file itself; after stop() the handle is closed and the file still readable
        # (a crash test that found the worker alive stops it first, then reports its output).
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_killed(self, timeout: float = 20.0) -> None:
        """It must die by its own SIGKILL (the fault injection), not exit."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the worker did not crash:\n{self.output()}") from None
        assert code == -signal.SIGKILL, f"exit code {code}:\n{self.output()}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *processes: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for process in processes:
            if process.process.poll() is not None:
                raise AssertionError(f"worker exited ({process.process.returncode}):\n{process.output()}")
        time.sleep(0.05)
    logs = "\n".join(process.output()[-3000:] for process in processes)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def scrape(client: TestClient, auth: Callable[..., dict[str, str]]) -> str:
    """`/metrics` as Prometheus sees it (with an auditor's token)."""
    response = client.get("/metrics", headers=auth("prometheus", "auditor"))
    assert response.status_code == 200, response.text
    return response.text
