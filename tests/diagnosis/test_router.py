"""The diagnosis over HTTP and as evidence in the workflow, against the real DNSSEC/SMTP lab."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.auth import Principal
from app.core.config import Settings
from app.diagnosis.service import rate_limit_key
from tests.helpers import VALID_REQUEST, Headers, lab_settings
from tests.lab.lab import Lab
from tests.lab.topology import SELFTEST_SERVFAIL


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(dane_lab: Lab, settings_overrides: dict[str, Any]) -> Settings:
    return lab_settings(
        dane_lab,
        diagnosis_on_create=True,
        diagnosis_rate_per_minute=5,
        **settings_overrides,
    )


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    # The diagnosis does not touch the database; one backend is enough here.
    return str(request.param)


def test_diagnosis_of_a_stale_domain_recommends_the_served_key(
    client: TestClient, auth: Callable[..., Headers], dane_lab: Lab
) -> None:
    response = client.get("/v1/diagnostics/Stale.Example.Test", headers=auth("alice", "requester"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["domain"], body["verdict"], body["failure_class"]) == ("stale.example.test", "blocked", "A")
    host = body["hosts"][0]
    assert body["recommended"]["policy"] == "fingerprint"
    assert body["recommended"]["parameters"] == f"match={host['pkey_fingerprint']}"
    assert host["addresses"][0]["status"] == "tlsa-mismatch"


def test_dnssec_bogus_domain_says_no_tls_policy_helps(client: TestClient, auth: Callable[..., Headers]) -> None:
    body = client.get("/v1/diagnostics/bogus.test", headers=auth("erin", "auditor")).json()
    assert (body["verdict"], body["failure_class"], body["recommended"]) == ("blocked", "F", None)
    assert "no tls policy" in body["explanation"].lower()


def test_diagnosis_input_auth_and_rate_limit(client: TestClient, auth: Callable[..., Headers]) -> None:
    assert client.get("/v1/diagnostics/good.example.test").status_code == 401
    bad = client.get("/v1/diagnostics/not a domain", headers=auth("alice", "requester"))
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["field"] == "path.domain"
    alabel = client.get("/v1/diagnostics/xn--zz.example", headers=auth("alice", "requester"))
    assert alabel.status_code == 422 and "A-label" in alabel.json()["errors"][0]["message"]
    statuses = [
        client.get("/v1/diagnostics/good.example.test", headers=auth("bob", "approver")).status_code for _ in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    limited = client.get("/v1/diagnostics/good.example.test", headers=auth("bob", "approver"))
    assert limited.headers["content-type"] == "application/problem+json" and int(limited.headers["retry-after"]) >= 1
    # The limit is per caller: somebody else is not affected.
    assert client.get("/v1/diagnostics/good.example.test", headers=auth("carol", "approver")).status_code == 200


def _create(client: TestClient, auth: Callable[..., Headers], **fields: Any) -> Any:
    return client.post("/v1/overrides", json={**VALID_REQUEST, **fields}, headers=auth("alice", "requester"))


def test_request_stores_the_diagnosis_and_flags_a_weaker_policy(
    client: TestClient, auth: Callable[..., Headers]
) -> None:
    response = _create(client, auth, destination="stale.example.test", policy="may")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["diagnosis"]["verdict"] == "blocked" and body["diagnosis"]["failure_class"] == "A"
    rules = {f["rule"]: f for f in body["findings"]}
    assert set(rules) == {"weaker_than_recommended", "plaintext_allowed"}  # `may`: always said
    assert (
        rules["weaker_than_recommended"]["refused"] is False
        and "fingerprint" in rules["weaker_than_recommended"]["message"]
    )
    # The reviewer sees the same evidence when reading the request.
    again = client.get(f"/v1/overrides/{body['id']}", headers=auth("bob", "approver")).json()
    assert again["diagnosis"] == body["diagnosis"] and again["findings"] == body["findings"]


def test_recommended_override_raises_no_finding(client: TestClient, auth: Callable[..., Headers]) -> None:
    diagnosis = client.get("/v1/diagnostics/stale.example.test", headers=auth("alice", "requester")).json()
    recommended = diagnosis["recommended"]
    response = _create(
        client,
        auth,
        destination="stale.example.test",
        policy=recommended["policy"],
        parameters=recommended["parameters"],
    )
    assert response.status_code == 201, response.text
    assert response.json()["findings"] == []


def test_useless_policy_is_refused_and_nothing_is_stored(client: TestClient, auth: Callable[..., Headers]) -> None:
    response = _create(client, auth, destination="bogus.test", policy="encrypt")
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["field"] == "body.policy"
    listing = client.get("/v1/overrides", headers=auth("dave", "admin")).json()
    assert listing["items"] == []


@pytest.mark.parametrize("settings_overrides", [{"dns_selftest_name": SELFTEST_SERVFAIL}])
def test_a_failing_self_test_does_not_hide_a_bogus_domain(client: TestClient, auth: Callable[..., Headers]) -> None:
    body = client.get("/v1/diagnostics/bogus.test", headers=auth("erin", "auditor")).json()
    assert (body["verdict"], body["failure_class"], body["resolver_validates"]) == ("blocked", "F", True)
    assert body["selftest"]["rcode"] == "SERVFAIL" and body["mx"]["security"] == "bogus"
    # Every override is still refused as useless: Postfix defers before TLS.
    for policy in ("may", "encrypt"):
        response = _create(client, auth, destination="bogus.test", policy=policy)
        assert response.status_code == 422, response.text
        assert "no TLS policy can help" in response.json()["errors"][0]["message"]


def test_passing_domain_is_flagged_not_refused(client: TestClient, auth: Callable[..., Headers]) -> None:
    response = _create(client, auth, destination="good.example.test", policy="encrypt")
    assert response.status_code == 201, response.text
    findings = response.json()["findings"]
    assert [(f["rule"], f["refused"]) for f in findings] == [("domain_passes", False)]
    assert "no override is needed" in findings[0]["message"]


def test_next_hop_destinations_are_not_diagnosed(client: TestClient, auth: Callable[..., Headers]) -> None:
    response = _create(client, auth, destination="[mx1.example.test]:25", policy="encrypt")
    assert response.status_code == 201, response.text
    assert response.json()["diagnosis"] is None and response.json()["findings"] == []


def test_an_integration_shares_one_budget_whoever_it_acts_for(client: TestClient, auth: Callable[..., Headers]) -> None:
    # Rotating X-On-Behalf-Of must not buy a fresh budget per made-up user.
    statuses = [
        client.get(
            "/v1/diagnostics/good.example.test",
            headers=auth("bot", "integration", client_id="ticketing", on_behalf_of=f"user{i}"),
        ).status_code
        for i in range(6)
    ]
    assert statuses == [200] * 5 + [429]
    # The people it acts for keep their own budget when they call directly.
    assert client.get("/v1/diagnostics/good.example.test", headers=auth("user1", "requester")).status_code == 200


def test_rate_limit_key() -> None:
    person = Principal(actor="alice", name="Alice", roles=frozenset())
    bot = Principal(actor="user7", name="User 7", roles=frozenset(), via="ticketing")
    assert rate_limit_key(person) == "actor:alice"
    assert rate_limit_key(replace(person, actor="ALİCE")) == "actor:alice"  # one budget per person
    assert rate_limit_key(bot) == rate_limit_key(replace(bot, actor="user8")) == "via:ticketing"
