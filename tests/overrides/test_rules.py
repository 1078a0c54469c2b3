"""The rules around decisions: approvals per policy, no self-approval, one vote each, durations,
one live override per destination, extensions, If-Match, and listing with filters and cursors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from app.core.db import transaction, utcnow
from app.overrides import lifecycle
from tests.helpers import act, apply_now, assert_problem, audit_rows, counts, events, load, make_settings

FINGERPRINT = "match=" + ":".join(["AB"] * 32)
PARAMETERS = {"fingerprint": FINGERPRINT}


@pytest.fixture
def people(auth: Callable[..., dict[str, str]]) -> dict[str, dict[str, str]]:
    return {
        "alice": auth("alice", "requester"),
        "alice+": auth("alice", "requester", "approver"),  # a reviewer who also asks for overrides
        "bob": auth("bob", "approver"),
        "carol": auth("carol", "approver"),
        "dave": auth("dave", "approver"),
        "root": auth("root", "admin"),
        "bot-for-alice": auth("bot", "integration", client_id="ticketing", on_behalf_of="alice"),
        "bot-for-bob": auth("bot", "integration", client_id="ticketing", on_behalf_of="bob"),
        # A review bot: its own token grants approver, so it reads (and may decide on) every request.
        "reviewbot-for-bob": auth("rb", "integration", "approver", client_id="reviewbot", on_behalf_of="bob"),
    }


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


# ---------------------------------------------------------------------------------------------------------------
# Approvals


def test_policy_none_needs_two_approvals(client: Any, make_override: Any, people: Any) -> None:
    created = make_override(policy="none")
    assert created["approvals_required"] == 2
    first = act(client, created["id"], "approve", people["bob"])
    assert first.status_code == 200, first.text
    assert first.json()["state"] == "pending" and first.json()["version"] == 2
    assert [a["reviewer"] for a in first.json()["approvals"]] == ["bob"]
    second = act(client, created["id"], "approve", people["carol"])
    assert second.json()["state"] == "approved" and second.json()["version"] == 3
    trail = events(client, created["id"], people["bob"])
    assert [(e["action"], e["actor"]) for e in trail] == [
        ("override.created", "alice"),
        ("vote.approve", "bob"),
        ("override.approval_recorded", "bob"),
        ("vote.approve", "carol"),
        ("override.approved", "carol"),
    ]
    assert trail[2]["after"]["approvals"] == 1 and trail[2]["after"]["state"] == "pending"
    assert trail[4]["after"]["approvals"] == 2


def test_other_policies_need_one_approval(client: Any, make_override: Any, people: Any, subtests: Any) -> None:
    for n, policy in enumerate(["may", "encrypt", "verify", "secure", "dane", "dane-only", "fingerprint"]):
        with subtests.test(policy=policy):
            created = make_override(destination=f"p{n}.example", policy=policy, parameters=PARAMETERS.get(policy, ""))
            assert created["approvals_required"] == 1 and created["state"] == "pending"
            assert act(client, created["id"], "approve", people["bob"]).json()["state"] == "approved"


@pytest.mark.parametrize("settings", [make_settings(approvals_required={"encrypt": 3})], ids=["encrypt=3"])
def test_approvals_are_configurable(client: Any, make_override: Any, people: Any) -> None:
    created = make_override()
    assert created["approvals_required"] == 3
    for reviewer, state in (("bob", "pending"), ("carol", "pending"), ("dave", "approved")):
        assert act(client, created["id"], "approve", people[reviewer]).json()["state"] == state


@pytest.mark.parametrize("settings", [make_settings(auto_approve_policies=["dane-only", "encrypt"])], ids=["auto"])
def test_only_policies_stronger_than_the_default_are_auto_approved(
    client: Any, make_override: Any, people: Any
) -> None:
    strong = make_override(policy="dane-only")
    assert strong["state"] == "approved" and strong["approvals_required"] == 0
    assert [(e["action"], e["actor"]) for e in events(client, strong["id"], people["alice"])] == [
        ("override.created", "alice"),
        ("override.auto_approved", "system"),
    ]
    weak = make_override(destination="example.net", policy="encrypt")  # configured, but weakens security
    assert weak["state"] == "pending" and weak["approvals_required"] == 1


def test_no_self_approval(client: Any, engine: Engine, make_override: Any, people: Any, subtests: Any) -> None:
    created = make_override(requester="alice")
    for who, via in (("alice+", None), ("bot-for-alice", "ticketing")):
        for action in ("approve", "reject"):
            with subtests.test(who=who, action=action):
                refused = len(audit_rows(engine, "auth.refused"))
                body = assert_problem(act(client, created["id"], action, people[who]), 403)
                assert "own request" in body["detail"]
                rows = audit_rows(engine, "auth.refused")
                assert len(rows) == refused + 1
                assert (rows[-1]["actor"], rows[-1]["via"], rows[-1]["override_id"]) == ("alice", via, created["id"])
    after = load(engine, created["id"])
    assert (after.state.value, after.version) == ("pending", 1)
    assert counts(engine)["vote"] == 0


def test_an_integration_may_approve_for_someone_else(client: Any, make_override: Any, people: Any) -> None:
    created = make_override()
    response = act(client, created["id"], "approve", people["reviewbot-for-bob"])
    assert response.json()["state"] == "approved", response.text
    [vote] = response.json()["votes"]
    assert (vote["reviewer"], vote["via"]) == ("bob", "reviewbot")


def test_an_integration_decides_only_on_what_it_sees(
    client: Any, engine: Engine, make_override: Any, people: Any
) -> None:
    """Naming a reviewer does not open every request to a ticketing integration: alice asked directly."""
    created = make_override()
    assert_problem(act(client, created["id"], "approve", people["bot-for-bob"]), 404)
    after = load(engine, created["id"])
    assert (after.state.value, after.version) == ("pending", 1)


def test_one_vote_per_reviewer(client: Any, engine: Engine, make_override: Any, people: Any, subtests: Any) -> None:
    created = make_override(policy="none")
    assert act(client, created["id"], "approve", people["bob"]).status_code == 200
    for who, action in (("bob", "approve"), ("bob", "reject"), ("reviewbot-for-bob", "approve")):
        with subtests.test(who=who, action=action):
            before = counts(engine)
            body = assert_problem(act(client, created["id"], action, people[who]), 409)
            assert "already voted" in body["detail"]
            assert counts(engine) == before
    override = load(engine, created["id"])
    assert (override.state.value, override.version) == ("pending", 2)


def test_a_decision_after_the_review_window_is_refused(
    client: Any, engine: Engine, make_override: Any, people: Any
) -> None:
    created = make_override()
    with transaction(engine) as session:
        override = lifecycle.load(session, created["id"])
        override.review_deadline = utcnow() - timedelta(seconds=1)
        session.add(override)
    body = assert_problem(act(client, created["id"], "approve", people["bob"]), 409)
    assert "review window" in body["detail"]
    assert load(engine, created["id"]).state.value == "pending" and counts(engine)["vote"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Durations


def test_default_duration_is_seven_days_and_counts_from_apply(
    client: Any, engine: Engine, make_override: Any, people: Any
) -> None:
    created = make_override(duration=None)
    assert created["duration"] == "P7D" and created["expires_at"] is None
    act(client, created["id"], "approve", people["bob"])
    active = apply_now(engine, created["id"])
    assert active.expires_at is not None and active.applied_at is not None
    assert active.expires_at - active.applied_at == timedelta(days=7)


def test_duration_bounds(client: Any, engine: Engine, make_override: Any, people: Any, subtests: Any) -> None:
    assert make_override(destination="max.example", duration="P30D")["duration"] == "P30D"
    assert make_override(destination="short.example", duration="PT1H")["duration"] == "PT1H"
    for duration in ("P31D", "PT720H1S", "PT0S", "P0D"):
        with subtests.test(duration=duration):
            before = counts(engine)
            body = {
                "destination": "bounds.example",
                "policy": "encrypt",
                "justification": "Recipient TLSA records are stale after a rollover.",
                "duration": duration,
            }
            response = client.post("/v1/overrides", json=body, headers=people["alice"])
            assert_problem(response, 422, field="body.duration")
            assert counts(engine) == before


@pytest.mark.parametrize(
    "settings", [make_settings(default_duration=timedelta(days=1), max_duration=timedelta(days=2))], ids=["short"]
)
def test_duration_bounds_are_configurable(client: Any, make_override: Any, people: Any) -> None:
    assert make_override(duration=None)["duration"] == "P1D"
    response = client.post(
        "/v1/overrides",
        json={
            "destination": "long.example",
            "policy": "encrypt",
            "justification": "Recipient TLSA records are stale after a rollover.",
            "duration": "P3D",
        },
        headers=people["alice"],
    )
    assert "2 days" in assert_problem(response, 422, field="body.duration")["detail"]


# ---------------------------------------------------------------------------------------------------------------
# One live override per target and destination


def test_second_live_override_for_a_destination_is_409_with_a_link(
    client: Any, engine: Engine, make_override: Any, people: Any, auth: Any, subtests: Any
) -> None:
    first = make_override(destination="example.org")
    for spelling in ("example.org", " EXAMPLE.org. "):
        with subtests.test(spelling=spelling):
            before = counts(engine)
            response = client.post(
                "/v1/overrides",
                json={
                    "destination": spelling,
                    "policy": "may",
                    "justification": "Another engineer asks for the same thing.",
                },
                headers=auth("bea", "requester"),
            )
            body = assert_problem(response, 409)
            assert body["existing"] == f"/v1/overrides/{first['id']}"
            assert counts(engine) == before
    act(client, first["id"], "approve", people["bob"])
    apply_now(engine, first["id"])
    assert_problem(client.post("/v1/overrides", json={**_req("example.org")}, headers=people["alice"]), 409)
    act(client, first["id"], "revoke", people["root"])  # removing: still holds the destination
    assert_problem(client.post("/v1/overrides", json={**_req("example.org")}, headers=people["alice"]), 409)


def _req(destination: str, **fields: Any) -> dict[str, Any]:
    return {
        "destination": destination,
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale after a rollover.",
        **fields,
    }


def test_an_ended_override_frees_the_destination(client: Any, make_override: Any, people: Any) -> None:
    first = make_override(destination="example.org")
    act(client, first["id"], "cancel", people["alice"])
    response = client.post("/v1/overrides", json=_req("example.org"), headers=people["alice"])
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "settings",
    [make_settings(mailcow_targets={"eu": {"url": "https://mail-eu.example", "api_key": "k"}})],
    ids=["two-targets"],
)
def test_the_same_destination_on_another_target_is_allowed(client: Any, make_override: Any, people: Any) -> None:
    make_override(destination="example.org")
    response = client.post("/v1/overrides", json=_req("example.org", target="eu"), headers=people["alice"])
    assert response.status_code == 201, response.text
    assert response.json()["target"] == "eu"
    unknown = client.post("/v1/overrides", json=_req("example.org", target="us"), headers=people["alice"])
    assert_problem(unknown, 422, field="body.target")


# ---------------------------------------------------------------------------------------------------------------
# Extensions


@pytest.fixture
def active(client: Any, engine: Engine, make_override: Any, people: Any) -> Callable[..., dict[str, Any]]:
    def make(**fields: Any) -> dict[str, Any]:
        created = make_override(**fields)
        for reviewer in ("bob", "carol")[: created["approvals_required"]]:
            act(client, created["id"], "approve", people[reviewer])
        apply_now(engine, created["id"], mailcow_id=42)
        response = client.get(f"/v1/overrides/{created['id']}", headers=people["alice"])
        assert response.json()["state"] == "active"
        result: dict[str, Any] = response.json()
        return result

    return make


def test_extension_is_approved_by_someone_else_and_has_no_gap(
    client: Any, engine: Engine, active: Any, people: Any
) -> None:
    override = active()
    asked = act(client, override["id"], "extend", people["alice"], duration="P2D", comment="Recipient needs more time.")
    assert asked.status_code == 200, asked.text
    pending = asked.json()
    assert pending["state"] == "active" and pending["expires_at"] == override["expires_at"]
    assert pending["pending_extension"]["duration"] == "P2D"
    assert pending["pending_extension"]["requested_by"] == "alice"
    assert pending["version"] == override["version"] + 1
    assert_problem(act(client, override["id"], "approve", people["alice+"]), 403)  # not their own extension
    approved = act(client, override["id"], "approve", people["bob"])  # bob approved the request too: fine
    assert approved.status_code == 200, approved.text
    extended = approved.json()
    assert extended["state"] == "active" and extended["pending_extension"] is None
    assert _when(extended["expires_at"]) - _when(override["expires_at"]) == timedelta(days=2)
    assert extended["duration"] == "P5D" and extended["mailcow_id"] == 42  # same mailcow row
    assert [(v["reviewer"], v["round"]) for v in extended["votes"]] == [("bob", 0), ("bob", 1)]
    trail = [e for e in events(client, override["id"], people["alice"]) if e["action"] != "auth.refused"]
    requested, vote, done = trail[-3:]
    assert (requested["action"], requested["actor"]) == ("override.extension_requested", "alice")
    assert vote["action"] == "vote.approve" and vote["after"]["round"] == 1
    assert (done["action"], done["actor"], done["before"]["state"], done["after"]["state"]) == (
        "override.extended",
        "bob",
        "active",
        "active",
    )
    assert _when(done["after"]["expires_at"]) - _when(done["before"]["expires_at"]) == timedelta(days=2)


def test_extension_is_bounded_by_the_maximum_total(
    client: Any, engine: Engine, active: Any, people: Any, subtests: Any
) -> None:
    override = active(duration="P3D")
    for duration in ("P28D", "PT649H"):
        with subtests.test(duration=duration):
            before = counts(engine)
            response = act(client, override["id"], "extend", people["alice"], duration=duration)
            assert "27 days" in assert_problem(response, 422, field="body.duration")["detail"]
            assert counts(engine) == before
    assert act(client, override["id"], "extend", people["alice"], duration="P27D").status_code == 200
    assert_problem(act(client, override["id"], "extend", people["alice"], duration="P1D"), 409)  # one at a time
    assert act(client, override["id"], "approve", people["carol"]).json()["duration"] == "P30D"
    assert_problem(act(client, override["id"], "extend", people["alice"], duration="PT1S"), 422, field="body.duration")


def test_rejected_extension_keeps_the_override_active(client: Any, active: Any, people: Any) -> None:
    override = active()
    act(client, override["id"], "extend", people["alice"], duration="P1D")
    response = act(client, override["id"], "reject", people["carol"], comment="Fix the TLSA records instead.")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "active" and body["pending_extension"] is None
    assert body["expires_at"] == override["expires_at"] and body["duration"] == override["duration"]
    last = events(client, override["id"], people["alice"])[-1]
    assert (last["action"], last["actor"], last["after"]["state"]) == ("override.extension_rejected", "carol", "active")
    assert act(client, override["id"], "extend", people["alice"], duration="P1D").status_code == 200  # may ask again


def test_extension_of_a_none_policy_needs_two_approvals(client: Any, active: Any, people: Any) -> None:
    override = active(policy="none")
    act(client, override["id"], "extend", people["alice"], duration="P1D")
    assert act(client, override["id"], "approve", people["dave"]).json()["pending_extension"] is not None
    done = act(client, override["id"], "approve", people["bob"]).json()
    assert done["pending_extension"] is None
    assert _when(done["expires_at"]) - _when(override["expires_at"]) == timedelta(days=1)


def test_extension_before_apply_lengthens_the_duration(
    client: Any, engine: Engine, make_override: Any, people: Any
) -> None:
    created = make_override(duration="P3D")
    act(client, created["id"], "approve", people["bob"])
    act(client, created["id"], "extend", people["alice"], duration="P1D")
    assert act(client, created["id"], "approve", people["carol"]).json()["duration"] == "P4D"
    applied = apply_now(engine, created["id"])
    assert applied.expires_at is not None and applied.applied_at is not None
    assert applied.expires_at - applied.applied_at == timedelta(days=4)


def test_someone_elses_extension_is_refused_and_audited(client: Any, engine: Engine, active: Any, auth: Any) -> None:
    override = active()
    mallory = auth("mallory", "requester", "approver")
    assert_problem(act(client, override["id"], "extend", mallory, duration="P1D"), 403)
    [row] = audit_rows(engine, "auth.refused")
    assert (row["actor"], row["override_id"]) == ("mallory", override["id"])


# ---------------------------------------------------------------------------------------------------------------
# ETag / If-Match


def test_if_match(client: Any, engine: Engine, make_override: Any, people: Any) -> None:
    created = make_override(policy="none")
    got = client.get(f"/v1/overrides/{created['id']}", headers=people["bob"])
    assert got.headers["etag"] == '"1"'
    first = client.post(
        f"/v1/overrides/{created['id']}/approve",
        json={"comment": "ok"},
        headers=people["bob"] | {"If-Match": '"1"'},
    )
    assert first.status_code == 200 and first.headers["etag"] == '"2"'
    before = counts(engine)
    stale = client.post(
        f"/v1/overrides/{created['id']}/approve",
        json={"comment": "ok"},
        headers=people["carol"] | {"If-Match": '"1"'},
    )
    assert "version 2" in assert_problem(stale, 412)["detail"]
    assert counts(engine) == before
    fresh = client.post(
        f"/v1/overrides/{created['id']}/approve",
        json={"comment": "ok"},
        headers=people["carol"] | {"If-Match": 'W/"2", "7"'},
    )
    assert fresh.json()["state"] == "approved", fresh.text


@pytest.mark.parametrize("settings", [make_settings(require_if_match=True)], ids=["if-match-required"])
def test_if_match_can_be_required(client: Any, engine: Engine, make_override: Any, people: Any) -> None:
    created = make_override()
    before = counts(engine)
    assert_problem(act(client, created["id"], "approve", people["bob"]), 428)
    assert counts(engine) == before
    response = client.post(
        f"/v1/overrides/{created['id']}/approve", json={"comment": "ok"}, headers=people["bob"] | {"If-Match": "*"}
    )
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------------------------------
# Listing


def test_list_filters_and_visibility(client: Any, engine: Engine, make_override: Any, people: Any, auth: Any) -> None:
    a1 = make_override(destination="a1.example", ticket="OPS-1")
    a2 = make_override(destination="Bücher.Example", ticket="OPS-2")
    b1 = make_override(requester="bea", destination="b1.example", ticket="OPS-1")
    act(client, a2["id"], "approve", people["bob"])
    act(client, b1["id"], "reject", people["bob"])

    def ids(headers: dict[str, str], **params: Any) -> list[int]:
        response = client.get("/v1/overrides", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    reviewer = people["bob"]
    assert ids(reviewer) == [b1["id"], a2["id"], a1["id"]]  # newest first
    assert ids(people["alice"]) == [a2["id"], a1["id"]]  # requesters see their own
    assert ids(auth("bea", "requester"), requester="alice") == []
    assert ids(reviewer, state="pending") == [a1["id"]]
    assert ids(reviewer, state=["approved", "rejected"]) == [b1["id"], a2["id"]]
    assert ids(reviewer, destination="B1.example") == [b1["id"]]
    assert ids(reviewer, destination="bücher.example") == [a2["id"]]
    assert ids(reviewer, destination="xn--bcher-kva.example") == [a2["id"]]
    assert ids(reviewer, requester="bea") == [b1["id"]]
    assert ids(reviewer, ticket="OPS-1") == [b1["id"], a1["id"]]
    assert ids(reviewer, target="default") == [b1["id"], a2["id"], a1["id"]]
    assert ids(reviewer, target="other") == []
    assert ids(reviewer, overdue="true") == []
    act(client, a2["id"], "revoke", people["root"])  # approved, apply not started: revoked at once
    late = make_override(destination="late.example")
    act(client, late["id"], "approve", people["bob"])
    apply_now(engine, late["id"])
    act(client, late["id"], "revoke", people["root"])
    with transaction(engine) as session:  # the worker has not managed to remove it in time
        override = lifecycle.load(session, late["id"])
        override.removal_deadline = utcnow() - timedelta(minutes=1)
        session.add(override)
    assert ids(reviewer, overdue="true") == [late["id"]]
    assert late["id"] not in ids(reviewer, overdue="false")
    assert client.get(f"/v1/overrides/{late['id']}", headers=reviewer).json()["overdue"] is True
    assert_problem(client.get("/v1/overrides", params={"state": "bogus"}, headers=reviewer), 422, field="query.state.0")
    assert_problem(client.get("/v1/overrides", params={"cursor": "xyz"}, headers=reviewer), 422, field="query.cursor")
    assert_problem(client.get("/v1/overrides", params={"limit": 0}, headers=reviewer), 422, field="query.limit")


def test_cursor_pagination_is_stable_while_inserting(client: Any, make_override: Any, people: Any) -> None:
    original = [make_override(destination=f"page{n}.example")["id"] for n in range(7)]
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/overrides", params=params, headers=people["bob"]).json()
        seen += [item["id"] for item in page["items"]]
        make_override(destination=f"new{pages}.example")  # arrives while someone is paging
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(original, reverse=True)  # no duplicates, no misses, stable order
    assert pages == 4
