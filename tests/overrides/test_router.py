"""What a reviewer reads in every override answer: the summary first, findings before the diagnosis; lists
in the compact view unless `?view=full`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.db import transaction
from app.overrides.models import Override
from tests.helpers import COMMENT, Headers, assert_problem

STORED_DIAGNOSIS = {
    "domain": "example.org",
    "verdict": "blocked",
    "failure_class": "A",
    "recommended": {"policy": "fingerprint", "parameters": "match=AA:BB"},
    "hosts": [{"name": "mx.example.org", "certificate": "MII" + "A" * 3000}],
}


def _with_diagnosis(engine: Engine, override_id: int) -> None:
    with transaction(engine) as session:
        row = session.get(Override, override_id)
        assert row is not None
        row.diagnosis = STORED_DIAGNOSIS
        session.add(row)


def test_every_answer_starts_with_the_summary(
    client: TestClient, engine: Engine, make_override: Any, auth: Callable[..., Headers]
) -> None:
    created = make_override(policy="none")
    assert next(iter(created)) == "summary"
    assert created["summary"] == {
        "line": "none · not diagnosed · plaintext always (TLS off)",
        "loses": ["plaintext always (TLS off)"],
        "verdict": None,
        "recommended": None,
        "weaker_than_recommended": None,
        "stuck_mail": None,
    }
    _with_diagnosis(engine, created["id"])
    bob = auth("bob", "approver")
    one = client.get(f"/v1/overrides/{created['id']}", headers=bob).json()
    assert next(iter(one)) == "summary"
    assert one["summary"]["line"] == (
        "none · blocked (A: TLSA mismatch) · plaintext always (TLS off) · weaker than the recommended fingerprint"
    )
    assert (one["summary"]["verdict"], one["summary"]["recommended"], one["summary"]["weaker_than_recommended"]) == (
        "blocked (A: TLSA mismatch)",
        "fingerprint match=AA:BB",
        True,
    )
    keys = list(one)
    assert keys.index("findings") < keys.index("diagnosis")
    acted = client.post(f"/v1/overrides/{created['id']}/approve", json=COMMENT, headers=bob).json()
    assert next(iter(acted)) == "summary" and acted["summary"] == one["summary"]
    for view in ("compact", "full"):
        [item] = client.get("/v1/overrides", params={"view": view}, headers=bob).json()["items"]
        assert next(iter(item)) == "summary" and item["summary"] == one["summary"]


def test_lists_are_compact_unless_asked_for_in_full(
    client: TestClient, engine: Engine, make_override: Any, auth: Callable[..., Headers]
) -> None:
    created = make_override(policy="may")
    _with_diagnosis(engine, created["id"])
    bob = auth("bob", "approver")
    full_one = client.get(f"/v1/overrides/{created['id']}", headers=bob).json()
    [brief] = client.get("/v1/overrides", headers=bob).json()["items"]
    assert not {"diagnosis", "votes", "queue", "queue_release"} & set(brief)
    assert brief == {
        key: value for key, value in full_one.items() if key not in ("diagnosis", "votes", "queue", "queue_release")
    }
    assert [f["rule"] for f in brief["findings"]] == ["plaintext_allowed"]
    assert brief["links"] == {
        "self": f"/v1/overrides/{created['id']}",
        "events": f"/v1/overrides/{created['id']}/events",
    }
    [full] = client.get("/v1/overrides", params={"view": "full"}, headers=bob).json()["items"]
    assert full == full_one
    assert_problem(client.get("/v1/overrides", params={"view": "everything"}, headers=bob), 422, field="query.view")


def test_may_and_none_always_yield_a_finding(client: TestClient, make_override: Any, subtests: Any) -> None:
    """Without any diagnosis (diagnosis off here; a next hop never has one) a reviewer still reads what
    `may` and `none` let through."""
    cases = {
        ("may", "example.org"): "may allows plaintext: mail to example.org goes unencrypted",
        ("none", "[mx.example.net]:25"): "none turns TLS off: all mail to [mx.example.net]:25 goes in plaintext",
    }
    for n, ((policy, destination), start) in enumerate(cases.items()):
        with subtests.test(policy=policy):
            created = make_override(destination=destination, policy=policy, target="default", ticket=f"T-{n}")
            [finding] = created["findings"]
            assert (finding["rule"], finding["severity"], finding["refused"]) == ("plaintext_allowed", "warning", False)
            assert finding["message"].startswith(start)
    assert make_override(destination="strict.example", policy="encrypt")["findings"] == []


def test_the_views_are_documented(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    parameters = {p["name"]: p for p in document["paths"]["/v1/overrides"]["get"]["parameters"]}
    assert parameters["view"]["schema"]["enum"] == ["compact", "full"]
    item = document["components"]["schemas"]["OverridePage"]["properties"]["items"]["items"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in item["anyOf"]} == {"OverrideRead", "OverrideBrief"}
    brief = document["components"]["schemas"]["OverrideBrief"]["properties"]
    assert next(iter(brief)) == "summary" and "diagnosis" not in brief
    assert "stuck_mail" in document["components"]["schemas"]["SummaryRead"]["properties"]
