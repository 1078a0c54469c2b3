"""A ticketing integration as it would really run: a client-credentials token from the real OpenID
provider (tests/oidc), fetched and attached by authlib's OAuth 2 client; the API over real HTTP; its
events received by a real HTTP server on a sink scoped to the integration (`requested_via`) and verified
with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

# authlib's httpx client suggests `httpx2` when imported, through a filter of its own ("always") that
# would outrank pytest's: its module comes first, so that the suggestion can be set aside here.
import authlib.deprecate  # noqa: F401
import httpx
import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy.engine import Engine
from standardwebhooks.webhooks import Webhook

from app.core.config import DEFAULT_ROLE_MAP, Settings
from app.main import create_app
from app.notify.service import deliver
from tests.helpers import COMMENT, VALID_REQUEST, LiveServer, free_port, make_settings
from tests.oidc.fixtures import DEFAULT_API_SCOPES, OidcProvider, default_secret

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

CLIENT = "svc-ticketing"  # in the provider's group tlso-integrations
SECRET = "whsec_" + base64.b64encode(b"ticketing-sink-secret-32-bytes!!").decode()
TICKET = "MAIL-4711"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Receiver:
    """The ticketing system's webhook endpoint: a real HTTP server that keeps what it is sent."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        app = FastAPI()

        @app.post("/tlsoverride")
        async def hook(request: Request) -> Response:
            self.deliveries.append((dict(request.headers), await request.body()))
            return Response(status_code=204)

        self.server = LiveServer(app)

    def verified(self) -> list[dict[str, Any]]:
        """Every delivery checked as a receiver must (signature, timestamp), each webhook-id once."""
        seen: dict[str, dict[str, Any]] = {}
        for headers, raw in self.deliveries:
            Webhook(SECRET).verify(raw, headers)  # raises on a bad signature or a stale timestamp
            seen.setdefault(headers["webhook-id"], json.loads(raw))
        return list(seen.values())


@dataclass
class Setup:
    base: str
    settings: Settings
    engine: Engine
    provider: OidcProvider
    receiver: Receiver

    def person(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.provider.user_token(name)}"}

    async def deliver_until(self, done: Any, timeout: float = 20.0) -> None:
        """Delivery passes, as the worker makes them, until `done()` (at least one pass)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as http:
            await deliver(self.engine, self.settings, http, "worker-1")
            while not done():
                assert time.monotonic() < deadline, "events not delivered in time"
                await deliver(self.engine, self.settings, http, "worker-1")
                await asyncio.sleep(0.02)


@pytest.fixture
def setup(engine: Engine, oidc_provider: OidcProvider) -> Iterator[Setup]:
    receiver = Receiver()
    with receiver.server:
        port = free_port()  # the port first: the settings name the API's own address
        base = f"http://127.0.0.1:{port}"
        settings = make_settings(
            oidc_issuer=oidc_provider.issuer,
            oidc_audience=oidc_provider.audience,
            oidc_roles_claim="groups",
            oidc_role_map=DEFAULT_ROLE_MAP,
            oidc_algorithms=["RS256", "ES256"],
            public_base_url=base,
            retry_initial_seconds=0.0,
            notify_webhooks={
                "ticketing": {"url": f"{receiver.server.url}/tlsoverride", "secret": SECRET, "requested_via": CLIENT}
            },
        )
        with LiveServer(create_app(settings, engine=engine), port=port):
            yield Setup(base, settings, engine, oidc_provider, receiver)


@pytest.fixture
async def integration(setup: Setup) -> AsyncIterator[AsyncOAuth2Client]:
    """The integration's HTTP client: authlib fetches its token (client credentials) and attaches it."""
    async with AsyncOAuth2Client(
        client_id=CLIENT,
        client_secret=default_secret(CLIENT),
        scope=DEFAULT_API_SCOPES,
        token_endpoint=setup.provider.token_url,
        base_url=setup.base,
        timeout=10,
    ) as client:
        token = await client.fetch_token(grant_type="client_credentials")
        assert token["token_type"].lower() == "bearer" and token["access_token"].count(".") == 2
        yield client


async def _create_for_alice(integration: AsyncOAuth2Client) -> dict[str, Any]:
    answer = await integration.post(
        "/v1/overrides",
        json={**VALID_REQUEST, "destination": "broken-dane.example", "ticket": TICKET},
        headers={"X-On-Behalf-Of": "alice"},
    )
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    assert (created["requested_by"], created["requested_via"], created["ticket"]) == ("alice", CLIENT, TICKET)
    return created


async def test_an_integration_receives_the_events_of_what_it_submitted_and_nothing_else(
    setup: Setup, integration: AsyncOAuth2Client
) -> None:
    await setup.deliver_until(lambda: True)  # one pass: a new sink starts at the end of the trail
    ours = await _create_for_alice(integration)
    # Someone else's request, made without the integration: its sink must not hear of it.
    other = httpx.post(
        f"{setup.base}/v1/overrides",
        json={**VALID_REQUEST, "destination": "other.example", "ticket": "OPS-9"},
        headers=setup.person("alice"),
    )
    assert other.status_code == 201, other.text
    bob = setup.person("bob")
    for override_id in (ours["id"], other.json()["id"]):
        approved = httpx.post(f"{setup.base}/v1/overrides/{override_id}/approve", json=COMMENT, headers=bob)
        assert approved.status_code == 200, approved.text

    await setup.deliver_until(lambda: len(setup.receiver.verified()) >= 2)
    events = setup.receiver.verified()
    assert [event["type"] for event in events] == ["override.created", "override.approved"]
    for event in events:
        snapshot = event["data"]["override"]
        assert snapshot["id"] == ours["id"] and snapshot["ticket"] == TICKET and snapshot["requested_via"] == CLIENT
        assert snapshot["links"]["self"] == f"{setup.base}/v1/overrides/{ours['id']}"
    assert (events[0]["data"]["actor"], events[0]["data"]["via"]) == ("alice", CLIENT)
    assert events[1]["data"]["actor"] == "bob" and events[1]["data"]["override"]["state"] == "approved"


async def test_an_integration_follows_what_it_submitted_without_naming_a_user(
    setup: Setup, integration: AsyncOAuth2Client
) -> None:
    ours = await _create_for_alice(integration)
    other = httpx.post(f"{setup.base}/v1/overrides", json=VALID_REQUEST, headers=setup.person("alice"))
    assert other.status_code == 201, other.text
    approved = httpx.post(f"{setup.base}/v1/overrides/{ours['id']}/approve", json=COMMENT, headers=setup.person("bob"))
    assert approved.status_code == 200, approved.text

    # No X-On-Behalf-Of from here on: the integration polls as itself.
    shown = await integration.get(f"/v1/overrides/{ours['id']}")
    assert shown.status_code == 200, shown.text
    assert (shown.json()["ticket"], shown.json()["state"]) == (TICKET, "approved")
    listed = await integration.get("/v1/overrides", params={"ticket": TICKET})
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["items"]] == [ours["id"]]
    trail = await integration.get(f"/v1/overrides/{ours['id']}/events")
    assert trail.status_code == 200, trail.text
    actions = [event["action"] for event in trail.json()]
    assert actions[0] == "override.created" and "override.approved" in actions, actions
    # What it did not submit stays out of its sight.
    assert (await integration.get(f"/v1/overrides/{other.json()['id']}")).status_code in (403, 404)
