"""Every refused role check says who the caller is, the roles they have and the role they lack — one
wording (`Principal.lacks`), and nothing more (not whether the override exists, not the token)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.auth import Principal
from tests.helpers import COMMENT, Headers, act, apply_now, assert_problem, audit_rows


def test_the_wording() -> None:
    alice = Principal(actor="alice", name="Alice", roles=frozenset({"requester"}))
    assert alice.lacks("approver", to="decide on requests") == (
        "alice (roles: requester) lacks the role approver to decide on requests."
    )
    bot = Principal(actor="carol", name="Carol", roles=frozenset(), via="ticketing", token_roles=frozenset())
    assert bot.lacks("admin", "auditor", to="read the metrics", or_owner=True) == (
        "carol via ticketing (roles: none) is not the requester and lacks one of the roles admin, auditor to read "
        "the metrics."
    )


def test_every_role_check_names_the_caller_and_the_missing_role(
    client: TestClient, engine: Engine, make_override: Any, auth: Callable[..., Headers], subtests: Any
) -> None:
    override_id = make_override("alice")["id"]
    applied = make_override("alice", destination="applied.example")["id"]
    assert act(client, applied, "approve", auth("bob", "approver")).status_code == 200
    apply_now(engine, applied)
    requester, auditor = auth("dave", "requester"), auth("erin", "auditor")
    approver = auth("bob", "approver")
    cases: list[tuple[str, Any, str]] = [
        (
            "require()",
            client.get("/v1/audit", headers=requester),
            "dave (roles: requester) lacks one of the roles auditor, admin to GET /v1/audit.",
        ),
        (
            "metrics",
            client.get("/metrics", headers=requester),
            "dave (roles: requester) lacks one of the roles admin, auditor to read the metrics.",
        ),
        (
            "notifications",
            client.get("/v1/notifications", headers=approver),
            "bob (roles: approver) lacks the role admin to manage notifications.",
        ),
        (
            "approve",
            act(client, override_id, "approve", auditor),
            "erin (roles: auditor) lacks one of the roles approver, admin to decide on requests.",
        ),
        (
            "revoke",
            act(client, applied, "revoke", approver),
            "bob (roles: approver) lacks the role admin to revoke an override.",
        ),
        (
            "cancel",
            act(client, override_id, "cancel", approver),
            "bob (roles: approver) is not the requester and lacks the role admin to cancel an override.",
        ),
        (
            "extend",
            act(client, applied, "extend", approver, duration="P1D"),
            "bob (roles: approver) is not the requester and lacks the role admin to ask to extend an override.",
        ),
        (
            "resolve-conflict",
            client.post(
                f"/v1/overrides/{applied}/resolve-conflict", json=COMMENT | {"action": "abandon"}, headers=approver
            ),
            "bob (roles: approver) lacks the role admin to resolve a conflict.",
        ),
        (
            "resume a target",
            client.post("/v1/targets/default/resume", json=COMMENT, headers=approver),
            "bob (roles: approver) lacks the role admin to resume a target.",
        ),
        (
            "X-On-Behalf-Of",
            client.get("/v1/overrides", headers=auth("bob", "approver", on_behalf_of="carol")),
            "bob (roles: approver) lacks the role integration to send X-On-Behalf-Of.",
        ),
    ]
    for name, response, detail in cases:
        with subtests.test(check=name):
            assert assert_problem(response, 403)["detail"] == detail
    body = {"destination": "new.example", "policy": "encrypt", "justification": "Recipient TLSA records are stale."}
    refused = assert_problem(client.post("/v1/overrides", json=body, headers=auditor), 403)
    assert refused["detail"] == "erin (roles: auditor) lacks one of the roles requester, admin to request overrides."
    # the audit trail has the same words as the answer
    assert any(row["comment"] == refused["detail"] for row in audit_rows(engine, "auth.refused"))


def test_an_override_the_caller_may_not_see_stays_a_404(
    client: TestClient, make_override: Any, auth: Callable[..., Headers]
) -> None:
    override_id = make_override("alice")["id"]
    body = assert_problem(act(client, override_id, "cancel", auth("dave", "requester")), 404)
    assert "dave" not in body["detail"] and "alice" not in body["detail"]
