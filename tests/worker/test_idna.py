"""A name with an IDNA deviation character (ß, ς, ZWJ, ZWNJ) has two forms in mailcow: ours (IDNA2008,
`xn--strae-oqa.example`) and the one mailcow's UI stores when a human types it (transitional UTS #46,
`strasse.example`). A hand-made row in either form is a conflict, drift and the targets view see both, and
the request says which form it covers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from app.core.config import Settings
from app.overrides.models import OverrideState
from app.worker.loop import Worker
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import COMMENT, load
from tests.standin import calls, mailcow_client, mailcow_rows, served
from tests.worker.helpers import (
    ALICE,
    ROOT_ADMIN,
    approved,
    expire_now,
    reconcile_now,
    settle,
    worker_settings,
)

S = OverrideState
Auth = Callable[..., dict[str, str]]
OURS, THEIRS = "xn--strae-oqa.example", "strasse.example"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def standin_url(standin_app: Starlette) -> Iterator[str]:
    with served(standin_app) as url:
        yield url


@pytest.fixture
def settings(standin_url: str) -> Settings:
    return worker_settings(mailcow_url=standin_url)  # the API reads the live map over HTTP too


@pytest.fixture
async def worker(engine: Engine, settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(engine, settings, owner="w1")
    yield worker
    await worker.aclose()


# Whatever a test does, the audit chain it leaves verifies (tests/worker/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_stays_valid")


async def typed_in_mailcows_ui(app: Starlette, dest: str, policy: str, active: bool = True) -> None:
    """What mailcow's UI does with a name a human types: its add, which normalises transitionally."""
    async with mailcow_client(app) as client:
        await client.add_policy(dest, policy, active=active)


async def test_a_hand_made_row_in_the_transitional_form_is_a_conflict(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, standin_app: Starlette
) -> None:
    await typed_in_mailcows_ui(standin_app, "straße.example", "may", active=False)
    override_id = approved(client, auth, "straße.example")
    assert load(engine, override_id).destination == OURS
    standin.calls.clear()
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.approved and override.conflict is not None
    assert override.conflict["status"] == "open" and override.conflict["row"]["dest"] == THEIRS
    assert calls(standin, "add") == [] and list(mailcow_rows(standin)) == [THEIRS]
    view = client.get("/v1/targets/default/policies", headers=auth(*ROOT_ADMIN)).json()
    assert [(row["dest"], row["conflict_of"]) for row in view["rows"]] == [(THEIRS, override_id)]

    # replace: theirs goes, ours is added; at the end theirs comes back as it was (inactive)
    decided = client.post(
        f"/v1/overrides/{override_id}/resolve-conflict",
        json={**COMMENT, "action": "replace"},
        headers=auth(*ROOT_ADMIN),
    )
    assert decided.status_code == 200, decided.text
    await worker.tick()
    assert load(engine, override_id).state == S.active
    assert list(mailcow_rows(standin)) == [OURS]
    expire_now(engine, override_id)
    await settle(worker, 2)
    assert load(engine, override_id).state == S.expired
    assert [(r["dest"], r["policy"], r["active"]) for r in standin.rows()] == [(THEIRS, "may", 0)]


async def test_our_row_gone_and_a_hand_made_one_in_the_other_form_is_replaced_drift(
    client: TestClient, auth: Auth, engine: Engine, worker: Worker, standin: MailcowStandin, standin_app: Starlette
) -> None:
    override_id = approved(client, auth, "straße.example")
    await worker.tick()
    override = load(engine, override_id)
    assert override.state == S.active and override.mailcow_id is not None
    del standin.table.rows[override.mailcow_id]
    await typed_in_mailcows_ui(standin_app, "Straße.example", "none")
    reconcile_now(engine)
    await worker.tick()
    drift = load(engine, override_id).drift
    assert drift is not None and drift["kind"] == "replaced" and drift["found"]["dest"] == THEIRS
    view = client.get("/v1/targets/default/policies", headers=auth(*ROOT_ADMIN)).json()
    assert [(m["override_id"], m["drift"]["kind"]) for m in view["missing"]] == [(override_id, "replaced")]


def test_the_request_says_which_form_it_covers(client: TestClient, auth: Auth) -> None:
    body = {"policy": "encrypt", "justification": "Recipient TLSA records are stale after a rollover."}
    created = client.post("/v1/overrides", json={**body, "destination": "Straße.example"}, headers=auth(*ALICE))
    assert created.status_code == 201, created.text
    findings = created.json()["findings"]
    assert [(f["rule"], f["severity"], f["refused"]) for f in findings] == [("idna_deviation", "warning", False)]
    message = findings[0]["message"]
    assert "ß (sharp s)" in message and f"stored as {OURS}" in message and f"as {THEIRS}" in message
    plain = client.post("/v1/overrides", json={**body, "destination": "bücher.example"}, headers=auth(*ALICE))
    assert plain.status_code == 201 and plain.json()["findings"] == []


def test_the_finding_can_refuse_requests_when_configured(client: TestClient, auth: Auth) -> None:
    client.app.state.settings = client.app.state.settings.model_copy(update={"refuse_rules": ["idna_deviation"]})  # type: ignore[attr-defined]
    body = {"policy": "encrypt", "justification": "Recipient TLSA records are stale after a rollover."}
    refused = client.post("/v1/overrides", json={**body, "destination": "faß.de"}, headers=auth(*ALICE))
    assert refused.status_code == 422 and "IDNA2008" in refused.json()["detail"]
