"""Refused attempts: a flood on one override does not flood its history, and every attempt stays provable
(the sum of `after.attempts` over `auth.refused` rows). Both kinds of refusal — a role or rule refused
by the state machine, and `X-On-Behalf-Of` from a non-integration — go through the same rule."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent, RefusalTally
from app.audit.refusals import close_refusal_windows, record_refusal
from app.audit.service import verify_chain
from app.core.config import Settings
from app.core.db import transaction
from tests.helpers import act, assert_problem, audit_keys, make_settings


@pytest.fixture
def settings() -> Settings:
    return make_settings(audit_refusal_window_seconds=300, audit_refusals_per_window=3)


def _refusals(engine: Engine, override_id: int | None = None) -> list[AuditEvent]:
    with Session(engine) as session:
        query = select(AuditEvent).where(AuditEvent.action == "auth.refused")
        if override_id is not None:
            query = query.where(AuditEvent.override_id == override_id)
        return list(session.exec(query.order_by(col(AuditEvent.seq))).all())


def _attempts(rows: list[AuditEvent]) -> int:
    return sum(int((row.after or {}).get("attempts", 1)) for row in rows)


def _end_windows(engine: Engine) -> None:
    """As if the window had passed (the opening time moves back, the clock does not move on)."""
    with transaction(engine) as session:
        for tally in session.exec(select(RefusalTally)).all():
            tally.opened_at -= timedelta(seconds=301)
            session.add(tally)


def test_a_flood_of_refusals_is_counted_not_written(
    client: Any, engine: Engine, auth: Any, make_override: Any, settings: Settings
) -> None:
    override_id = make_override()["id"]
    erin = auth("erin", "auditor")
    for _ in range(10):
        assert_problem(act(client, override_id, "approve", erin), 403)
    rows = _refusals(engine, override_id)
    assert [(r.actor, (r.after or {}).get("attempted")) for r in rows] == [("erin", "approve")] * 3
    with Session(engine) as session:
        [tally] = session.exec(select(RefusalTally)).all()
        assert (tally.written, tally.suppressed) == (3, 7)
    # The window ends: the worker puts the count on record, once.
    _end_windows(engine)
    assert close_refusal_windows(engine, settings) == 1
    assert close_refusal_windows(engine, settings) == 0
    rows = _refusals(engine, override_id)
    assert len(rows) == 4 and _attempts(rows) == 10
    summary = rows[-1]
    assert (summary.actor, summary.via, summary.override_id) == ("erin", None, override_id)
    assert summary.after is not None and (summary.after["attempted"], summary.after["attempts"]) == ("approve", 7)
    assert summary.comment is not None and "7 more refused attempts" in summary.comment
    assert summary.comment.endswith(f"(the last refused because: {rows[0].comment})")
    # The override's own history shows four refusals, not ten.
    history = client.get(f"/v1/overrides/{override_id}/events", headers=erin).json()
    assert sum(1 for event in history if event["action"] == "auth.refused") == 4
    with Session(engine) as session:
        assert verify_chain(session, audit_keys()).valid


def test_the_next_refusal_after_the_window_carries_the_count(
    client: Any, engine: Engine, auth: Any, make_override: Any
) -> None:
    """X-On-Behalf-Of from a non-integration is refused before any service runs: the same rule."""
    override_id = make_override()["id"]
    bob_for_carol = auth("bob", "approver", on_behalf_of="carol")
    for _ in range(5):
        assert_problem(act(client, override_id, "approve", bob_for_carol), 403)
    assert len(_refusals(engine, override_id)) == 3
    _end_windows(engine)
    assert_problem(act(client, override_id, "approve", bob_for_carol), 403)
    rows = _refusals(engine, override_id)
    assert [(r.after or {}).get("attempts") for r in rows] == [None, None, None, 2, None]
    assert _attempts(rows) == 6
    assert all(r.actor == "bob" for r in rows)


def test_refusals_are_coalesced_per_caller_override_and_action(
    client: Any, engine: Engine, auth: Any, make_override: Any
) -> None:
    one, two = make_override()["id"], make_override(destination="example.net")["id"]
    for _ in range(4):
        for override_id in (one, two):
            for who in ("erin", "frank"):
                for action in ("approve", "reject"):
                    assert_problem(act(client, override_id, action, auth(who, "auditor")), 403)
    rows = _refusals(engine)
    assert len(rows) == 2 * 2 * 2 * 3  # three in full for each caller, override and action
    with Session(engine) as session:
        assert sorted(t.suppressed for t in session.exec(select(RefusalTally)).all()) == [1] * 8


def test_with_no_window_every_refusal_is_written(engine: Engine) -> None:
    settings = make_settings(audit_refusal_window_seconds=0)
    for _ in range(5):
        record_refusal(
            engine, settings, actor="erin", via=None, override_id=None, after={"attempted": "x"}, comment="no"
        )
    assert len(_refusals(engine)) == 5


def test_simultaneous_first_refusals_are_all_counted(engine: Engine, settings: Settings) -> None:
    """Eight callers' first refusals race to create the tally row: one wins, the others count on it."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def refuse() -> None:
        try:
            barrier.wait(5)
            record_refusal(
                engine, settings, actor="erin", via="bot", override_id=7, after={"attempted": "approve"}, comment="no"
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=refuse) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    _end_windows(engine)
    close_refusal_windows(engine, settings)
    rows = _refusals(engine)
    assert len(rows) == 4 and _attempts(rows) == 8


async def test_the_worker_closes_windows_that_are_over(
    client: Any, engine: Engine, auth: Any, make_override: Any, settings: Settings
) -> None:
    from app.worker.loop import Worker

    override_id = make_override()["id"]
    for _ in range(5):
        assert_problem(act(client, override_id, "approve", auth("erin", "auditor")), 403)
    worker = Worker(engine, settings)
    try:
        await worker.tick()
        assert _attempts(_refusals(engine)) == 3  # the window is still open
        _end_windows(engine)
        await worker.tick()
    finally:
        await worker.aclose()
    assert _attempts(_refusals(engine)) == 5
    with Session(engine) as session:
        assert session.exec(select(RefusalTally)).all() == []
