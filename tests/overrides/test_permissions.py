"""Who sees which override: people their own, reviewers/admins/auditors all, and an integration what was
submitted through it (`requested_via` = its client id) — as itself, or acting for a user, but never
everything just because it names someone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import VALID_REQUEST, Headers, assert_problem

TICKET = {**VALID_REQUEST, "ticket": "MAIL-4711", "destination": "tickets.example"}


@pytest.fixture
def callers(auth: Callable[..., Headers]) -> dict[str, Headers]:
    return {
        "ticketing": auth("ticketing-sa", "integration", client_id="ticketing"),  # as itself
        "ticketing-for-carol": auth("ticketing-sa", "integration", client_id="ticketing", on_behalf_of="carol"),
        "ticketing-for-bob": auth("ticketing-sa", "integration", client_id="ticketing", on_behalf_of="bob"),
        "chatops": auth("chatops-sa", "integration", client_id="chatops"),
        "chatops-for-dave": auth("chatops-sa", "integration", client_id="chatops", on_behalf_of="dave"),
        "reviewbot": auth("review-sa", "integration", "auditor", client_id="reviewbot"),
        "alice": auth("alice", "requester"),
        "bob": auth("bob", "approver"),
    }


def _ids(client: TestClient, headers: Headers, **params: Any) -> list[int]:
    response = client.get("/v1/overrides", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def _create(client: TestClient, headers: Headers, **fields: Any) -> int:
    response = client.post("/v1/overrides", json={**VALID_REQUEST, **fields}, headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_an_integration_follows_what_it_submitted_without_naming_anyone(
    client: TestClient, callers: dict[str, Headers]
) -> None:
    created = client.post("/v1/overrides", json=TICKET, headers=callers["ticketing-for-carol"])
    assert created.status_code == 201, created.text
    assert (created.json()["requested_by"], created.json()["requested_via"]) == ("carol", "ticketing")
    ours = created.json()["id"]
    _create(client, callers["alice"], destination="alice.example")

    itself = callers["ticketing"]
    assert _ids(client, itself, ticket="MAIL-4711") == [ours]
    assert _ids(client, itself) == [ours]  # not alice's
    one = client.get(f"/v1/overrides/{ours}", headers=itself)
    assert one.status_code == 200 and one.json()["ticket"] == "MAIL-4711"
    trail = client.get(f"/v1/overrides/{ours}/events", headers=itself)
    assert trail.status_code == 200, trail.text
    assert [(e["action"], e["actor"], e["via"]) for e in trail.json()] == [("override.created", "carol", "ticketing")]


def test_naming_a_user_does_not_open_everything(client: TestClient, callers: dict[str, Headers]) -> None:
    alices = _create(client, callers["alice"], destination="alice.example")
    ours = _create(client, callers["ticketing-for-carol"], destination="tickets.example")
    dave_via_chatops = _create(client, callers["chatops-for-dave"], destination="chatops.example")

    # bob is a reviewer, but the ticketing integration acting for him reads only its own submissions (and
    # bob's own requests): TLSO_INTEGRATION_DELEGATED_ROLES lets it act for bob, not read as bob.
    for_bob = callers["ticketing-for-bob"]
    assert _ids(client, for_bob) == [ours]
    for hidden in (alices, dave_via_chatops):
        assert_problem(client.get(f"/v1/overrides/{hidden}", headers=for_bob), 404)
        assert_problem(client.get(f"/v1/overrides/{hidden}/events", headers=for_bob), 404)
    # one integration does not see another's
    assert _ids(client, callers["chatops"]) == [dave_via_chatops]
    assert_problem(client.get(f"/v1/overrides/{ours}", headers=callers["chatops"]), 404)
    # the named user's own requests are still theirs to see through the integration
    assert _ids(client, callers["chatops-for-dave"]) == [dave_via_chatops]


def test_the_named_users_own_requests_are_visible_through_any_integration(
    client: TestClient, auth: Callable[..., Headers], callers: dict[str, Headers]
) -> None:
    bobs = _create(client, auth("bob", "requester", "approver"), destination="bob.example")
    assert bobs in _ids(client, callers["ticketing-for-bob"])
    assert bobs not in _ids(client, callers["ticketing"])


def test_an_integration_whose_own_token_grants_reading_reads_everything(
    client: TestClient, callers: dict[str, Headers]
) -> None:
    alices = _create(client, callers["alice"], destination="alice.example")
    ours = _create(client, callers["ticketing-for-carol"], destination="tickets.example")
    assert _ids(client, callers["reviewbot"]) == [ours, alices]
    assert _ids(client, callers["bob"]) == [ours, alices]  # a reviewer's own token: everything, as before
