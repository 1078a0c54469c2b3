"""`GET /v1/me`: who the API takes the caller for, for every authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import Headers, assert_problem

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # no database work


def test_a_person_sees_their_identity_and_roles(client: TestClient, auth: Callable[..., Headers]) -> None:
    response = client.get("/v1/me", headers=auth("ALİCE", "requester", "approver"))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "actor": "ALİCE",
        "name": "ALİCE".title(),  # the token's `name` (the test identity provider titles the subject)
        "person_key": "alice",
        "roles": ["approver", "requester"],
        "via": None,
        "on_behalf_of": False,
        "sees": "all overrides",
    }


def test_an_integration_is_shown_with_its_client(client: TestClient, auth: Callable[..., Headers]) -> None:
    itself = client.get("/v1/me", headers=auth("ticketing-sa", "integration", client_id="ticketing")).json()
    assert (itself["actor"], itself["via"], itself["roles"], itself["on_behalf_of"]) == (
        "ticketing-sa",
        "ticketing",
        ["integration"],
        False,
    )
    assert itself["sees"] == "overrides requested by ticketing-sa and overrides submitted through ticketing"
    headers = auth("ticketing-sa", "integration", client_id="ticketing", on_behalf_of="carol")
    acting = client.get("/v1/me", headers=headers | {"X-On-Behalf-Of-Name": "Carol C."}).json()
    assert (acting["actor"], acting["name"], acting["via"], acting["roles"], acting["on_behalf_of"]) == (
        "carol",
        "Carol C.",
        "ticketing",
        ["approver", "requester"],  # TLSO_INTEGRATION_DELEGATED_ROLES
        True,
    )
    assert acting["sees"] == "overrides requested by carol and overrides submitted through ticketing"


def test_every_authenticated_caller_may_ask_and_nobody_else(client: TestClient, auth: Callable[..., Headers]) -> None:
    nobody = client.get("/v1/me", headers=auth("eve"))
    assert nobody.status_code == 200 and nobody.json()["roles"] == [] and nobody.json()["sees"].startswith("overrides")
    assert_problem(client.get("/v1/me"), 401)
    assert_problem(client.get("/v1/me", headers=auth("bob", "approver", on_behalf_of="carol")), 403)


def test_it_is_documented(client: TestClient) -> None:
    operation: dict[str, Any] = client.get("/openapi.json").json()["paths"]["/v1/me"]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MeRead"
    }
