"""The override state machine: every allowed transition, the forbidden ones, and their audit rows."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.core.errors import Conflict, InvalidTransition
from app.overrides import lifecycle
from app.overrides.models import (
    TERMINAL_STATES,
    ConflictStatus,
    EndReason,
    Override,
    OverrideState,
    QueueReleaseStatus,
)
from tests.helpers import act, apply_now, assert_problem, audit_rows, events, load, worker_step

S = OverrideState

# The lifecycle of design.md §3, written out independently of the code's table.
ALLOWED: dict[OverrideState, set[OverrideState]] = {
    S.pending: {S.approved, S.rejected, S.cancelled, S.lapsed},
    S.approved: {S.active, S.failed, S.cancelled, S.revoked, S.removing},
    S.active: {S.removing},
    S.removing: {S.expired, S.revoked, S.remediated, S.cancelled, S.failed},  # failed: after restoring a replaced row
    **{state: set() for state in TERMINAL_STATES},
}


@pytest.fixture
def people(auth: Callable[..., dict[str, str]]) -> dict[str, dict[str, str]]:
    return {
        "alice": auth("alice", "requester"),
        "bob": auth("bob", "approver"),
        "carol": auth("carol", "approver"),
        "root": auth("root", "admin"),
    }


@pytest.fixture
def bring_to(
    client: Any, engine: Engine, settings: Settings, make_override: Callable[..., dict[str, Any]], people: Any
) -> Callable[[OverrideState], int]:
    """An override (alice's, for a fresh destination) in the given state, reached the way production does."""
    serial = iter(range(1, 1000))

    def removing(override_id: int, reason: str) -> None:
        with transaction(engine) as session:
            override = lifecycle.load(session, override_id, for_update=True)
            lifecycle.begin_removal(
                session, override, EndReason(reason), actor="worker", via=None, comment="expiry", settings=settings
            )

    def make(state: OverrideState) -> int:
        override_id = int(make_override(destination=f"d{next(serial)}.example")["id"])
        if state == S.pending:
            return override_id
        if state == S.rejected:
            assert act(client, override_id, "reject", people["bob"]).status_code == 200
        elif state == S.cancelled:
            assert act(client, override_id, "cancel", people["alice"]).status_code == 200
        elif state == S.lapsed:
            with transaction(engine) as session:
                lifecycle.lapse(session, lifecycle.load(session, override_id, for_update=True))
        else:
            assert act(client, override_id, "approve", people["bob"]).status_code == 200
            if state == S.failed:
                worker_step(engine, override_id, S.failed, "override.failed", last_error="mailcow said no")
            elif state != S.approved:
                apply_now(engine, override_id)
                if state in {S.removing, S.expired, S.revoked, S.remediated}:
                    removing(override_id, state.value if state != S.removing else "expired")
                    if state != S.removing:
                        worker_step(engine, override_id, state, f"override.{state.value}_done")
        assert load(engine, override_id).state == state
        return override_id

    return make


def _last_events(client: Any, override_id: int, headers: dict[str, str], n: int) -> list[dict[str, Any]]:
    return events(client, override_id, headers)[-n:]


# ---------------------------------------------------------------------------------------------------------------
# Allowed transitions through the API


def test_create_is_pending_and_audited(client: Any, make_override: Any, people: Any) -> None:
    created = make_override()
    assert created["state"] == "pending" and created["version"] == 1
    assert created["approvals_required"] == 1 and created["requested_by"] == "alice"
    [event] = events(client, created["id"], people["alice"])
    assert event["action"] == "override.created" and event["actor"] == "alice" and event["via"] is None
    assert event["before"] is None and event["after"]["state"] == "pending"
    assert event["comment"] == created["justification"]


def test_approve_moves_pending_to_approved(client: Any, make_override: Any, people: Any) -> None:
    created = make_override()
    response = act(client, created["id"], "approve", people["bob"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "approved" and body["version"] == 2
    assert response.headers["etag"] == '"2"'
    assert [v["reviewer"] for v in body["approvals"]] == ["bob"]
    vote, approved = _last_events(client, created["id"], people["bob"], 2)
    assert vote["action"] == "vote.approve" and vote["actor"] == "bob" and vote["after"]["decision"] == "approve"
    assert approved["action"] == "override.approved" and approved["actor"] == "bob"
    assert approved["before"]["state"] == "pending" and approved["before"]["version"] == 1
    assert approved["after"]["state"] == "approved" and approved["after"]["version"] == 2
    assert approved["comment"] == "Checked the diagnosis and the ticket."


def test_reject_moves_pending_to_rejected(client: Any, make_override: Any, people: Any) -> None:
    created = make_override()
    response = act(client, created["id"], "reject", people["bob"], comment="Use the fingerprint policy instead.")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "rejected" and response.json()["version"] == 2
    assert response.json()["ended_at"] is not None
    vote, rejected = _last_events(client, created["id"], people["bob"], 2)
    assert vote["action"] == "vote.reject"
    assert rejected["action"] == "override.rejected" and rejected["actor"] == "bob"
    assert (rejected["before"]["state"], rejected["after"]["state"]) == ("pending", "rejected")
    assert rejected["comment"] == "Use the fingerprint policy instead."


def test_cancel_pending(client: Any, bring_to: Any, people: Any, subtests: Any) -> None:
    for who in ("alice", "root"):
        with subtests.test(who=who):
            override_id = bring_to(S.pending)
            response = act(client, override_id, "cancel", people[who])
            assert response.status_code == 200, response.text
            assert response.json()["state"] == "cancelled" and response.json()["end_reason"] == "cancelled"
            [event] = _last_events(client, override_id, people["root"], 1)
            assert event["action"] == "override.cancelled" and event["actor"] == who
            assert (event["before"]["state"], event["after"]["state"]) == ("pending", "cancelled")
            assert event["after"]["version"] == 2


def test_cancel_approved_before_apply_ends_at_once(client: Any, bring_to: Any, people: Any) -> None:
    override_id = bring_to(S.approved)
    response = act(client, override_id, "cancel", people["alice"])
    assert response.json()["state"] == "cancelled", response.text
    [event] = _last_events(client, override_id, people["alice"], 1)
    assert (event["action"], event["before"]["state"], event["after"]["state"]) == (
        "override.cancelled",
        "approved",
        "cancelled",
    )


def test_revoke_approved_before_apply_ends_at_once(client: Any, bring_to: Any, people: Any) -> None:
    override_id = bring_to(S.approved)
    response = act(client, override_id, "revoke", people["root"])
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "revoked" and response.json()["end_reason"] == "revoked"
    [event] = _last_events(client, override_id, people["root"], 1)
    assert (event["action"], event["actor"], event["before"]["state"], event["after"]["state"]) == (
        "override.revoked",
        "root",
        "approved",
        "revoked",
    )


def test_approved_with_an_add_sent_goes_through_removing(
    client: Any, engine: Engine, bring_to: Any, people: Any, subtests: Any
) -> None:
    for action, who, end in (("cancel", "alice", S.cancelled), ("revoke", "root", S.revoked)):
        with subtests.test(action=action):
            override_id = bring_to(S.approved)
            with transaction(engine) as session:  # the worker sent the add: the mailcow row may exist
                override = lifecycle.load(session, override_id)
                override.add_sent_at = utcnow()
                session.add(override)
            response = act(client, override_id, action, people[who])
            assert response.json()["state"] == "removing", response.text
            assert response.json()["removal_deadline"] is not None
            [event] = _last_events(client, override_id, people["root"], 1)
            assert (event["action"], event["before"]["state"], event["after"]["state"]) == (
                f"override.{end.value}",
                "approved",
                "removing",
            )
            done = worker_step(engine, override_id, lifecycle.END_STATE[end.value], "override.removed")
            assert done.state == end and not done.live and done.ended_at is not None


def test_worker_applies_and_expires(
    client: Any, engine: Engine, bring_to: Any, settings: Settings, people: Any
) -> None:
    override_id = bring_to(S.approved)
    before = load(engine, override_id)
    active = apply_now(engine, override_id)
    assert active.state == S.active and active.version == before.version + 1
    assert active.expires_at is not None and active.applied_at is not None
    assert active.expires_at - active.applied_at == timedelta(days=3)  # the clock starts when applied
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        lifecycle.begin_removal(
            session, override, EndReason.expired, actor="worker", via=None, comment=None, settings=settings
        )
    expired = worker_step(engine, override_id, S.expired, "override.removed", mailcow_id=None)
    assert expired.state == S.expired and expired.version == before.version + 3 and not expired.live
    applied, removing, removed = _last_events(client, override_id, people["bob"], 3)
    assert (applied["action"], applied["actor"], applied["before"]["state"], applied["after"]["state"]) == (
        "override.applied",
        "worker",
        "approved",
        "active",
    )
    assert applied["after"]["mailcow_id"] == 7
    assert (removing["action"], removing["after"]["state"]) == ("override.expired", "removing")
    assert (removed["before"]["state"], removed["after"]["state"]) == ("removing", "expired")


def test_active_is_ended_through_removing(
    client: Any, engine: Engine, bring_to: Any, people: Any, subtests: Any
) -> None:
    for action, who, end in (("revoke", "root", "revoked"), ("cancel", "alice", "cancelled")):
        with subtests.test(action=action):
            override_id = bring_to(S.active)
            response = act(client, override_id, action, people[who])
            assert response.status_code == 200, response.text
            assert response.json()["state"] == "removing" and response.json()["end_reason"] == end
            [event] = _last_events(client, override_id, people["root"], 1)
            assert (event["action"], event["actor"], event["before"]["state"], event["after"]["state"]) == (
                f"override.{end}",
                who,
                "active",
                "removing",
            )
            assert worker_step(engine, override_id, S(end), "override.removed").state == S(end)


def test_worker_driven_states_are_reachable_and_audited(client: Any, bring_to: Any, people: Any, subtests: Any) -> None:
    for state in (S.failed, S.lapsed, S.remediated, S.expired, S.revoked):
        with subtests.test(state=state.value):
            override_id = bring_to(state)
            last = events(client, override_id, people["root"])[-1]
            assert last["after"]["state"] == state.value and last["actor"] in {"worker", "system"}
            assert last["before"]["version"] + 1 == last["after"]["version"]


# ---------------------------------------------------------------------------------------------------------------
# Forbidden transitions through the API: 409 problem, nothing changes, nothing is audited

FORBIDDEN = [
    ("approve", S.rejected, "bob"),
    ("approve", S.cancelled, "bob"),
    ("approve", S.approved, "carol"),
    ("approve", S.active, "carol"),  # active without a pending extension
    ("approve", S.removing, "carol"),
    ("approve", S.lapsed, "carol"),
    ("reject", S.approved, "carol"),
    ("reject", S.active, "carol"),
    ("reject", S.expired, "carol"),
    ("cancel", S.rejected, "alice"),
    ("cancel", S.cancelled, "alice"),
    ("cancel", S.removing, "alice"),
    ("cancel", S.expired, "root"),
    ("cancel", S.failed, "alice"),
    ("revoke", S.pending, "root"),
    ("revoke", S.rejected, "root"),
    ("revoke", S.removing, "root"),
    ("revoke", S.revoked, "root"),
    ("extend", S.pending, "alice"),
    ("extend", S.removing, "alice"),
    ("extend", S.remediated, "alice"),
]


def test_forbidden_actions(client: Any, engine: Engine, bring_to: Any, people: Any, subtests: Any) -> None:
    for action, state, who in FORBIDDEN:
        with subtests.test(action=action, state=state.value):
            override_id = bring_to(state)
            before = load(engine, override_id)
            trail = len(audit_rows(engine))
            extra = {"duration": "P1D"} if action == "extend" else {}
            body = assert_problem(act(client, override_id, action, people[who], **extra), 409)
            assert body["type"].endswith("/invalid-transition") and state.value in body["detail"]
            after = load(engine, override_id)
            assert (after.state, after.version) == (before.state, before.version)
            assert len(audit_rows(engine)) == trail


# ---------------------------------------------------------------------------------------------------------------
# The table itself and the compare-and-set, through transition()


def _insert(engine: Engine, state: OverrideState, n: int) -> int:
    now = utcnow()
    with transaction(engine) as session:
        override = Override(
            target="default",
            destination=f"t{n}.example",
            policy="encrypt",
            justification="table test",
            duration_seconds=3600,
            state=state,
            live=state not in TERMINAL_STATES,
            requested_by="alice",
            requested_by_key="alice",
            requested_by_name="Alice",
            created_at=now,
            updated_at=now,
        )
        session.add(override)
        session.flush()
        assert override.id is not None
        return override.id


def test_transition_table_is_exactly_the_designed_one(engine: Engine) -> None:
    ids = {state: _insert(engine, state, n) for n, state in enumerate(S)}
    for source, override_id in ids.items():
        for target in S:
            with Session(engine) as session:
                override = lifecycle.load(session, override_id)
                if target in ALLOWED[source]:
                    moved = lifecycle.transition(session, override, target, actor="t", action="t")
                    assert moved.state == target and moved.version == 2
                    assert moved.live == (target not in TERMINAL_STATES)
                else:
                    with pytest.raises(InvalidTransition):
                        lifecycle.transition(session, override, target, actor="t", action="t")
                session.rollback()
    assert audit_rows(engine) == []  # rolled back: the queued audit entries went with it


def test_terminal_states_never_change_in_place(engine: Engine) -> None:
    for n, state in enumerate(sorted(TERMINAL_STATES)):
        override_id = _insert(engine, state, n)
        with Session(engine) as session, pytest.raises(InvalidTransition):
            lifecycle.update_in_place(
                session, lifecycle.load(session, override_id), actor="t", action="t", changes={"attempts": 1}
            )


def test_compare_and_set_refuses_a_stale_version(engine: Engine) -> None:
    override_id = _insert(engine, S.approved, 1)
    with Session(engine, expire_on_commit=False) as stale_session:
        stale = lifecycle.load(stale_session, override_id)  # read version 1
        stale_session.commit()  # end the read (SQLite has one writer: the other transaction must get in)
        with transaction(engine) as session:  # meanwhile someone else moves it on
            lifecycle.transition(session, lifecycle.load(session, override_id), S.active, actor="w1", action="applied")
        with pytest.raises(Conflict):
            lifecycle.transition(stale_session, stale, S.failed, actor="w2", action="failed")
        stale_session.rollback()
    winner = load(engine, override_id)
    assert (winner.state, winner.version) == (S.active, 2)
    assert [(e["actor"], e["action"]) for e in audit_rows(engine)] == [("w1", "applied")]


def test_compare_and_set_checks_the_version_not_only_the_state(engine: Engine) -> None:
    override_id = _insert(engine, S.active, 1)
    with Session(engine, expire_on_commit=False) as stale_session:
        stale = lifecycle.load(stale_session, override_id)
        stale_session.commit()
        with transaction(engine) as session:  # same state, new version (e.g. an extension)
            lifecycle.update_in_place(session, lifecycle.load(session, override_id), actor="a", action="noted")
        with pytest.raises(Conflict):
            lifecycle.transition(stale_session, stale, S.removing, actor="b", action="removing")
        stale_session.rollback()
    assert load(engine, override_id).state == S.active


# ---------------------------------------------------------------------------------------------------------------
# The conflict's own machine: a foreign row at the destination, changed only with the override itself

C = ConflictStatus
# Written out by hand, as the design says it: the lifecycle's table must be exactly this.
CONFLICT_ALLOWED: dict[ConflictStatus | None, set[ConflictStatus]] = {
    None: {C.open},
    C.open: {C.replace, C.abandoned},
    C.replace: {C.replaced, C.open, C.restoring},
    C.replaced: {C.restoring, C.open},
    C.restoring: {C.restored, C.not_restored},
    C.restored: set(),
    C.not_restored: set(),
    C.abandoned: set(),
}


def _conflict(status: ConflictStatus | None) -> dict[str, Any] | None:
    return None if status is None else {"status": status.value, "row": {"id": 3, "dest": "t.example"}}


def test_conflict_table_is_exactly_the_designed_one(engine: Engine) -> None:
    assert {k: set(v) for k, v in lifecycle.CONFLICT_TRANSITIONS.items()} == CONFLICT_ALLOWED
    for n, source in enumerate([None, *C]):
        override_id = _insert(engine, S.approved, n)
        if source is not None:
            with transaction(engine) as session:
                override = lifecycle.load(session, override_id)
                override.conflict = _conflict(source)  # set directly: a fixture, not a move
                session.add(override)
        for target in C:
            with Session(engine) as session:
                override = lifecycle.load(session, override_id)
                changes = {"conflict": _conflict(target)}
                if target in CONFLICT_ALLOWED[source]:
                    moved = lifecycle.update_in_place(session, override, actor="t", action="t", changes=changes)
                    assert moved.conflict_status == target
                else:
                    with pytest.raises(InvalidTransition):
                        lifecycle.update_in_place(session, override, actor="t", action="t", changes=changes)
                session.rollback()


def _audit(engine: Engine, override_id: int) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.exec(
            select(AuditEvent).where(AuditEvent.override_id == override_id).order_by(col(AuditEvent.seq))
        ).all()
        return [{"action": row.action, "before": row.before, "after": row.after} for row in rows]


def test_a_conflict_move_is_compare_and_set_and_audited(engine: Engine) -> None:
    override_id = _insert(engine, S.approved, 1)
    with transaction(engine) as session:
        lifecycle.update_in_place(
            session,
            lifecycle.load(session, override_id),
            actor="w",
            action="override.conflict",
            changes={"conflict": _conflict(C.open)},
        )
    with Session(engine, expire_on_commit=False) as stale_session:
        stale = lifecycle.load(stale_session, override_id)
        stale_session.commit()
        with transaction(engine) as session:  # an admin decides first
            lifecycle.update_in_place(
                session,
                lifecycle.load(session, override_id),
                actor="root",
                action="override.conflict_resolved",
                changes={"conflict": _conflict(C.replace)},
            )
        with pytest.raises(Conflict):  # the other decision, on the version it read, loses
            lifecycle.transition(
                stale_session,
                stale,
                S.failed,
                actor="eve",
                action="override.conflict_abandoned",
                changes={"conflict": _conflict(C.abandoned)},
            )
        stale_session.rollback()
    assert load(engine, override_id).conflict_status == C.replace
    moves = [
        (event["action"], (event["before"] or {}).get("conflict_status"), (event["after"] or {}).get("conflict_status"))
        for event in _audit(engine, override_id)
    ]
    assert moves == [("override.conflict", None, "open"), ("override.conflict_resolved", "open", "replace")]


# The release of an override's deferred mail (`queue_release.status`): what the queue pass may do to it.
Q = QueueReleaseStatus
QUEUE_MOVES = {
    None: {Q.releasing, Q.released, Q.watching},
    Q.releasing: {Q.releasing, Q.released, Q.watching},  # noted before each deliver; a takeover notes again
    Q.released: {Q.clear, Q.still_stuck, Q.watching},  # the first check
    Q.clear: {Q.clear, Q.still_stuck, Q.watching},  # later checks, while active: TLS deferrals come back
    Q.still_stuck: {Q.still_stuck, Q.clear, Q.watching},  # ... or the mail is gone
    Q.watching: {Q.watching, Q.watched},
    Q.watched: set(),
}


@pytest.mark.parametrize("old", list(QUEUE_MOVES))
def test_every_queue_release_move_is_allowed_or_refused_by_its_table(old: QueueReleaseStatus | None) -> None:
    for new in QueueReleaseStatus:
        if new in QUEUE_MOVES[old]:
            lifecycle.check_queue_release_move(old, new)
        else:
            with pytest.raises(InvalidTransition):
                lifecycle.check_queue_release_move(old, new)
