"""Evidence on create costs one diagnosis per domain and burst, none for replays and duplicates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.diagnosis import engine as diagnosis_engine
from app.diagnosis import service as diagnosis_service
from app.diagnosis.budget import RateLimiter
from tests.helpers import Headers, lab_settings
from tests.lab.lab import Lab


@pytest.fixture
def settings(dane_lab: Lab) -> Settings:
    return lab_settings(
        dane_lab,
        diagnosis_on_create=True,
    )


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_replays_duplicates_and_bursts_probe_the_domain_once(
    client: TestClient, auth: Callable[..., Headers], monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[str] = []

    async def counting(domain: str, config: Any) -> Any:
        probed.append(domain)
        return await diagnosis_engine.diagnose(domain, config)

    monkeypatch.setattr(diagnosis_service, "diagnose", counting)
    alice = auth("alice", "requester")
    body = {
        "destination": "stale.example.test",
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale after a rollover.",
    }
    first = client.post("/v1/overrides", json=body, headers=alice | {"Idempotency-Key": "T-1"})
    assert first.status_code == 201, first.text
    assert first.json()["diagnosis"]["failure_class"] == "A"
    for _ in range(3):  # the integration retries: replays
        replay = client.post("/v1/overrides", json=body, headers=alice | {"Idempotency-Key": "T-1"})
        assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    for _ in range(3):  # someone else asks again: 409, the live one is linked
        assert client.post("/v1/overrides", json=body, headers=auth("dave", "requester")).status_code == 409
    assert probed == ["stale.example.test"]

    other = client.post(
        "/v1/overrides", json={**body, "target": "default", "destination": "[mx.stale.example.test]"}, headers=alice
    )
    assert other.status_code == 201  # a next hop: not diagnosed at all
    cancelled = client.post(f"/v1/overrides/{first.json()['id']}/cancel", json={"comment": "wrong"}, headers=alice)
    assert cancelled.status_code == 200
    again = client.post("/v1/overrides", json=body, headers=alice)
    assert again.status_code == 201
    assert again.json()["diagnosis"] == first.json()["diagnosis"]  # within two minutes: the same evidence
    assert probed == ["stale.example.test"]


def test_fresh_diagnoses_on_create_share_the_callers_budget(
    client: TestClient, auth: Callable[..., Headers], app: Any
) -> None:
    app.state.diagnosis_limiter = RateLimiter(app.state.engine, 1)
    alice = auth("alice", "requester")
    body = {"policy": "encrypt", "justification": "Recipient TLSA records are stale after a rollover."}
    first = client.post("/v1/overrides", json={**body, "destination": "stale.example.test"}, headers=alice)
    assert first.status_code == 201 and first.json()["diagnosis"]["failure_class"] == "A"
    second = client.post("/v1/overrides", json={**body, "destination": "good.example.test"}, headers=alice)
    assert second.status_code == 201  # taken all the same: an urgent request never waits
    assert second.json()["diagnosis"]["error"].startswith("not diagnosed: At most 1 diagnoses a minute")
    assert client.get("/v1/diagnostics/good.example.test", headers=alice).status_code == 429


def test_diagnostics_need_a_role(client: TestClient, auth: Callable[..., Headers]) -> None:
    assert client.get("/v1/diagnostics/good.example.test", headers=auth("nobody")).status_code == 403


def test_may_on_a_domain_without_starttls_is_flagged(client: TestClient, auth: Callable[..., Headers]) -> None:
    """`may` fixes a domain whose MX offers no STARTTLS (class B), so the diagnosis finds nothing wrong with
    the request; what it lets through is still a finding, and the summary says what mail loses."""
    body = {
        "destination": "nostarttls.example.test",
        "policy": "may",
        "justification": "The recipient's MX lost STARTTLS; mail queued since 09:00.",
    }
    created = client.post("/v1/overrides", json=body, headers=auth("alice", "requester"))
    assert created.status_code == 201, created.text
    answer = created.json()
    assert answer["diagnosis"]["failure_class"] == "B"
    assert "plaintext_allowed" in [f["rule"] for f in answer["findings"]]
    assert answer["summary"]["loses"] == ["plaintext allowed", "certificate not checked"]
    assert answer["summary"]["verdict"].startswith("blocked (B")
