"""The remediation watch against the real lab: a recipient that passes DANE again is noticed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from app.audit.models import AuditEvent
from app.audit.service import verify_chain
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.overrides import lifecycle
from app.overrides.models import Override, OverrideState
from app.worker.loop import Worker
from app.worker.recheck import recheck_due
from tests.helpers import Headers, audit_keys, lab_settings
from tests.lab.lab import Lab


@pytest.fixture
def settings(dane_lab: Lab) -> Settings:
    return lab_settings(
        dane_lab,
        recheck_interval_seconds=0,
        remediation_checks=2,
        remediation="notify",
    )


def _active(client: TestClient, auth: Callable[..., Headers], engine: Engine, destination: str) -> int:
    created = client.post(
        "/v1/overrides",
        headers=auth("alice", "requester"),
        json={
            "destination": destination,
            "policy": "encrypt",
            "duration": "P1D",
            "justification": "Recipient TLSA records are stale after a certificate renewal.",
        },
    )
    assert created.status_code == 201, created.text
    override_id: int = created.json()["id"]
    approved = client.post(
        f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=auth("bob", "approver")
    )
    assert approved.status_code == 200, approved.text
    with transaction(engine) as session:  # what the worker does once mailcow has the row
        override = lifecycle.load(session, override_id)
        now = utcnow()
        lifecycle.transition(
            session,
            override,
            OverrideState.active,
            actor="system",
            action="override.applied",
            changes={"applied_at": now, "expires_at": now + timedelta(days=1), "mailcow_id": 7},
        )
    return override_id


def _actions(engine: Engine, override_id: int) -> list[str]:
    with Session(engine) as session:
        return [e.action for e in session.exec(select(AuditEvent).where(AuditEvent.override_id == override_id))]


async def test_fixed_recipient_is_noticed_once_after_n_clean_checks(
    client: TestClient, auth: Callable[..., Headers], engine: Engine, settings: Settings
) -> None:
    fixed = _active(client, auth, engine, "good.example.test")
    broken = _active(client, auth, engine, "stale.example.test")
    for _ in range(3):
        assert await recheck_due(engine, settings) == 2
    assert _actions(engine, fixed).count("recipient.fixed") == 1
    assert "recipient.fixed" not in _actions(engine, broken)
    with Session(engine) as session:
        good, stale = session.get(Override, fixed), session.get(Override, broken)
        assert good is not None and stale is not None
        assert (good.state, good.clean_checks, stale.clean_checks) == (OverrideState.active, 3, 0)
        assert good.version == stale.version  # bookkeeping does not invalidate reviewers' ETags
        assert verify_chain(session, audit_keys()).valid


async def test_remediation_end_removes_the_override_early(
    client: TestClient, auth: Callable[..., Headers], engine: Engine, settings: Settings
) -> None:
    end = settings.model_copy(update={"remediation": "end"})
    override_id = _active(client, auth, engine, "good.example.test")
    await recheck_due(engine, end)
    with Session(engine) as session:
        assert session.get(Override, override_id).state == OverrideState.active  # type: ignore[union-attr]
    await recheck_due(engine, end)
    with Session(engine) as session:
        override: Any = session.get(Override, override_id)
        assert (override.state, override.end_reason) == (OverrideState.removing, "remediated")
    assert _actions(engine, override_id)[-2:] == ["recipient.fixed", "override.remediated"]


async def test_not_due_overrides_are_not_rechecked(
    client: TestClient, auth: Callable[..., Headers], engine: Engine, settings: Settings
) -> None:
    _active(client, auth, engine, "good.example.test")
    hourly = settings.model_copy(update={"recheck_interval_seconds": 3600})
    assert await recheck_due(engine, hourly) == 1
    assert await recheck_due(engine, hourly) == 0


async def test_next_hop_destinations_rotate_instead_of_blocking_the_watch(
    client: TestClient, auth: Callable[..., Headers], engine: Engine, settings: Settings
) -> None:
    hop = _active(client, auth, engine, "[mx.good.example.test]:25")
    domain = _active(client, auth, engine, "good.example.test")
    assert await recheck_due(engine, settings, limit=1) == 0  # the next-hop entry is taken and set aside
    assert await recheck_due(engine, settings, limit=1) == 1  # ... so the domain gets its turn
    with Session(engine) as session:
        assert session.get(Override, hop).clean_checks == 0  # type: ignore[union-attr]
        assert session.get(Override, domain).clean_checks == 1  # type: ignore[union-attr]


async def test_the_worker_runs_the_watch_beside_its_loop(
    client: TestClient, auth: Callable[..., Headers], engine: Engine, settings: Settings
) -> None:
    override_id = _active(client, auth, engine, "good.example.test")
    worker = Worker(engine, settings.model_copy(update={"remediation": "end"}), owner="w1")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(100):
            if "recipient.fixed" in await asyncio.to_thread(_actions, engine, override_id):
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await worker.aclose()
    assert _actions(engine, override_id)[-2:] == ["recipient.fixed", "override.remediated"]
