"""End to end with a real OpenID provider (oidc-provider on loopback): discovery, JWKS, RS256 tokens
from the authorization-code + PKCE flow and from client credentials, groups mapped to roles."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.config import DEFAULT_ROLE_MAP
from app.main import create_app
from tests.helpers import VALID_REQUEST, make_settings
from tests.oidc.fixtures import OidcProvider, run_oidc_provider


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _client(engine: Engine, provider: OidcProvider, **overrides: object) -> TestClient:
    values: dict[str, object] = {
        "oidc_issuer": provider.issuer,
        "oidc_audience": provider.audience,
        "oidc_roles_claim": "groups",
        "oidc_role_map": DEFAULT_ROLE_MAP,
        "oidc_algorithms": ["RS256", "ES256"],
        **overrides,
    }
    settings = make_settings(**values)
    return TestClient(create_app(settings, engine=engine), raise_server_exceptions=False)


@pytest.fixture
def api(engine: Engine, oidc_provider: OidcProvider) -> Iterator[TestClient]:
    with _client(engine, oidc_provider) as client:
        yield client


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def test_people_log_in_with_pkce_and_their_groups_become_roles(api: TestClient, oidc_provider: OidcProvider) -> None:
    alice = oidc_provider.user_token("alice")
    created = api.post("/v1/overrides", json=VALID_REQUEST, headers=bearer(alice))
    assert created.status_code == 201, created.text
    override = created.json()
    assert override["requested_by"] == "alice"

    # alice is only a requester: she cannot approve (not even someone else's) and cannot read the audit trail.
    assert (
        api.post(f"/v1/overrides/{override['id']}/approve", json={"comment": "x"}, headers=bearer(alice)).status_code
        == 403
    )
    assert api.get("/v1/audit/verify", headers=bearer(alice)).status_code == 403

    bob = oidc_provider.user_token("bob")
    approved = api.post(
        f"/v1/overrides/{override['id']}/approve", json={"comment": "diagnosis checked"}, headers=bearer(bob)
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["state"] == "approved"
    assert approved.json()["approvals"][0]["reviewer"] == "bob"

    erin = oidc_provider.user_token("erin")
    verify = api.get("/v1/audit/verify", headers=bearer(erin))
    assert verify.status_code == 200 and verify.json()["valid"] is True


def test_an_integration_acts_for_a_named_user(api: TestClient, oidc_provider: OidcProvider) -> None:
    bot = oidc_provider.client_credentials_token("svc-ticketing")
    created = api.post(
        "/v1/overrides",
        json=VALID_REQUEST,
        headers=bearer(bot, **{"X-On-Behalf-Of": "alice", "X-On-Behalf-Of-Name": "Alice A."}),
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["requested_by"], body["requested_by_name"], body["requested_via"]) == (
        "alice",
        "Alice A.",
        "svc-ticketing",
    )
    # The rule about people applies to the human: the bot cannot approve alice's request for alice.
    refused = api.post(
        f"/v1/overrides/{body['id']}/approve",
        json={"comment": "self"},
        headers=bearer(bot, **{"X-On-Behalf-Of": "alice"}),
    )
    assert refused.status_code == 403
    events = api.get(f"/v1/overrides/{body['id']}/events", headers=bearer(oidc_provider.user_token("dave"))).json()
    assert (events[0]["actor"], events[0]["via"]) == ("alice", "svc-ticketing")

    # Without X-On-Behalf-Of a bot is nobody in particular: it has no person's roles.
    assert (
        api.post(
            "/v1/overrides", json={**VALID_REQUEST, "destination": "other.example"}, headers=bearer(bot)
        ).status_code
        == 403
    )


def test_machine_client_without_mapped_groups_gets_no_roles(api: TestClient, oidc_provider: OidcProvider) -> None:
    reader = oidc_provider.client_credentials_token("svc-reader")  # tlso-auditors
    assert api.get("/v1/audit", headers=bearer(reader)).status_code == 200
    assert api.post("/v1/overrides", json=VALID_REQUEST, headers=bearer(reader)).status_code == 403


def test_token_for_another_audience_is_refused(engine: Engine, oidc_provider: OidcProvider) -> None:
    token = oidc_provider.client_credentials_token("svc-reader")
    with _client(engine, oidc_provider, oidc_audience="https://some-other-api.example") as client:
        response = client.get("/v1/audit", headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


def test_keys_rotated_by_a_provider_restart_are_fetched_again(engine: Engine) -> None:
    """The provider makes new keys on each start; the API refetches the JWKS on the unknown `kid`."""
    with run_oidc_provider() as first:
        port, issuer = first.port, first.issuer
        client = _client(engine, first, oidc_jwks_min_refresh_seconds=0)
        client.__enter__()
        try:
            before = first.client_credentials_token("svc-reader")
            assert client.get("/v1/audit", headers=bearer(before)).status_code == 200
        except BaseException:
            client.__exit__(None, None, None)
            raise
    try:
        with run_oidc_provider(env={"OIDC_PORT": str(port), "OIDC_ISSUER": issuer}) as second:
            after = second.client_credentials_token("svc-reader")
            assert client.get("/v1/audit", headers=bearer(after)).status_code == 200
            # The old key is gone from the new JWKS: a token signed with it no longer passes.
            assert client.get("/v1/audit", headers=bearer(before)).status_code == 401
    finally:
        client.__exit__(None, None, None)
