"""Idempotency-Key on create and on actions: a retry gets the first answer, never a second change."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.core.db import utcnow
from tests.helpers import assert_problem, audit_rows, counts

BODY = {
    "destination": "example.org",
    "policy": "encrypt",
    "justification": "Recipient TLSA records are stale after a certificate renewal.",
    "duration": "P3D",
}


def _create(client: Any, headers: dict[str, str], key: str | None, body: dict[str, Any] | None = None) -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/overrides", json=body or BODY, headers=headers | extra)


def test_create_replay_returns_the_first_answer(client: Any, engine: Engine, auth: Any) -> None:
    alice = auth("alice", "requester")
    first = _create(client, alice, "k-1")
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = counts(engine)
    again = _create(client, alice, "k-1", {**BODY, "duration": "PT72H"})  # the same request, spelled differently
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert (again.headers["etag"], again.headers["location"]) == (first.headers["etag"], first.headers["location"])
    assert counts(engine) == after_first
    assert len(audit_rows(engine, "override.created")) == 1


def test_same_key_with_another_body_is_422(client: Any, engine: Engine, auth: Any) -> None:
    alice = auth("alice", "requester")
    assert _create(client, alice, "k-1").status_code == 201
    before = counts(engine)
    body = assert_problem(_create(client, alice, "k-1", {**BODY, "destination": "example.net"}), 422)
    assert body["type"].endswith("/idempotency-key-reused")
    assert counts(engine) == before


def test_keys_belong_to_their_caller(client: Any, auth: Any) -> None:
    assert _create(client, auth("alice", "requester"), "shared").status_code == 201
    other = _create(client, auth("bea", "requester"), "shared", {**BODY, "destination": "example.net"})
    assert other.status_code == 201 and "idempotent-replayed" not in other.headers
    bot = auth("bot", "integration", client_id="ticketing", on_behalf_of="alice")
    as_bot = _create(client, bot, "shared", {**BODY, "destination": "example.com"})
    assert as_bot.status_code == 201 and "idempotent-replayed" not in as_bot.headers


def test_a_key_belongs_to_the_person_not_to_a_spelling(client: Any, engine: Engine, auth: Any) -> None:
    """The owner is the person key: a retry whose token spells the subject otherwise is still a replay."""
    first = _create(client, auth("ALİCE", "requester"), "k-1")  # a Turkish locale's upper case
    assert first.status_code == 201, first.text
    again = _create(client, auth("alice", "requester"), "k-1")
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
    assert len(audit_rows(engine, "override.created")) == 1


def test_action_replay_and_reuse_on_another_action(client: Any, engine: Engine, auth: Any, make_override: Any) -> None:
    override_id = make_override(policy="none")["id"]
    bob = auth("bob", "approver") | {"Idempotency-Key": "decide-1"}
    first = client.post(f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=bob)
    assert first.status_code == 200 and first.json()["version"] == 2
    before = counts(engine)
    again = client.post(f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=bob)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert counts(engine) == before  # no second vote, no "already voted" 409 either
    reused = client.post(f"/v1/overrides/{override_id}/reject", json={"comment": "ok"}, headers=bob)
    assert assert_problem(reused, 422)["type"].endswith("/idempotency-key-reused")
    assert counts(engine) == before


def test_a_failed_request_does_not_use_up_its_key(client: Any, engine: Engine, auth: Any, make_override: Any) -> None:
    override_id = make_override()["id"]
    headers = auth("bob", "approver") | {"Idempotency-Key": "retry-me"}
    url = f"/v1/overrides/{override_id}/approve"
    assert_problem(client.post(url, json={"comment": "ok"}, headers=headers | {"If-Match": '"9"'}), 412)
    assert counts(engine)["idempotency_record"] == 0
    retried = client.post(url, json={"comment": "ok"}, headers=headers | {"If-Match": '"1"'})
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers


def test_a_refused_request_does_not_use_up_its_key(client: Any, engine: Engine, auth: Any, make_override: Any) -> None:
    override_id = make_override()["id"]
    headers = auth("erin", "auditor") | {"Idempotency-Key": "nope"}
    assert_problem(client.post(f"/v1/overrides/{override_id}/approve", json={"comment": "x"}, headers=headers), 403)
    assert counts(engine)["idempotency_record"] == 0
    assert len(audit_rows(engine, "auth.refused")) == 1


def test_records_expire(client: Any, engine: Engine, auth: Any) -> None:
    alice = auth("alice", "requester")
    assert _create(client, alice, "old").status_code == 201
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE idempotency_record SET created_at = :at"), {"at": _naive(utcnow() - timedelta(days=2))}
        )
    # Past the 24 h TTL the key is free again: this is a new request, and the destination is taken.
    assert_problem(_create(client, alice, "old"), 409)


def _naive(value: Any) -> Any:
    return value.replace(tzinfo=None)


def test_bad_keys_are_422(client: Any, engine: Engine, auth: Any) -> None:
    alice = auth("alice", "requester")
    before = counts(engine)
    for key in ("k" * 201, "tab\tkey"):
        assert_problem(_create(client, alice, key), 422, field="header.Idempotency-Key")
    assert counts(engine) == before


def test_a_replay_is_answered_through_the_response_model(client: Any, engine: Engine, auth: Any) -> None:
    """A kept answer goes out as the route's model shapes it, like the first one: a field the model does not
    have (kept by an older version, or written into the table by hand) never reaches the caller."""
    alice = auth("alice", "requester")
    first = _create(client, alice, "k-model")
    assert first.status_code == 201, first.text
    with engine.begin() as conn:
        kept = conn.execute(sa.text("SELECT id, body FROM idempotency_record WHERE key = 'k-model'")).one()
        body = kept.body if isinstance(kept.body, dict) else json.loads(kept.body)
        conn.execute(
            sa.text("UPDATE idempotency_record SET body = :body WHERE id = :id"),
            {"body": json.dumps({**body, "api_key": "not for anyone's eyes"}), "id": kept.id},
        )
    again = _create(client, alice, "k-model")
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
