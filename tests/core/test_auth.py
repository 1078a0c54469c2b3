"""Who may call what (role by endpoint), refused actions in the audit trail, JWT attacks, X-On-Behalf-Of."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy.engine import Engine

from app.core.devidp import DevIdentityProvider
from tests.helpers import COMMENT, act, assert_problem, audit_rows, counts, events

Headers = dict[str, str]

# Who calls: the override under test is always alice's.
CALLERS = {
    "requester": ("alice", ("requester",), None),
    "approver": ("bob", ("approver",), None),
    "admin": ("root", ("admin",), None),
    "auditor": ("erin", ("auditor",), None),
    "integration": ("bot", ("integration",), "ticketing"),
}

# endpoint → expected status per caller (None = no token); actions also name the state they start from.
READS: dict[str, dict[str | None, int]] = {
    "GET /v1/overrides": {"requester": 200, "approver": 200, "admin": 200, "auditor": 200, "integration": 200},
    "GET /v1/overrides/{id}": {"requester": 200, "approver": 200, "admin": 200, "auditor": 200, "integration": 404},
    "GET /v1/overrides/{id}/events": {
        "requester": 200,
        "approver": 200,
        "admin": 200,
        "auditor": 200,
        "integration": 404,
    },
    "GET /v1/audit": {"requester": 403, "approver": 403, "admin": 200, "auditor": 200, "integration": 403},
    "GET /v1/audit/verify": {"requester": 403, "approver": 403, "admin": 200, "auditor": 200, "integration": 403},
    "GET /v1/audit/export": {"requester": 403, "approver": 403, "admin": 200, "auditor": 200, "integration": 403},
}
ACTIONS: dict[str, tuple[str, dict[str, int]]] = {
    "create": ("-", {"requester": 201, "approver": 403, "admin": 201, "auditor": 403, "integration": 403}),
    "approve": ("pending", {"requester": 403, "approver": 200, "admin": 200, "auditor": 403, "integration": 404}),
    "reject": ("pending", {"requester": 403, "approver": 200, "admin": 200, "auditor": 403, "integration": 404}),
    "cancel": ("pending", {"requester": 200, "approver": 403, "admin": 200, "auditor": 403, "integration": 404}),
    "revoke": ("approved", {"requester": 403, "approver": 403, "admin": 200, "auditor": 403, "integration": 404}),
    "extend": ("approved", {"requester": 200, "approver": 403, "admin": 200, "auditor": 403, "integration": 404}),
}


@pytest.fixture
def caller(auth: Callable[..., Headers]) -> Callable[[str | None], Headers]:
    def make(role: str | None) -> Headers:
        if role is None:
            return {}
        sub, roles, client_id = CALLERS[role]
        return auth(sub, *roles, client_id=client_id)

    return make


def test_reads_role_matrix(client: Any, make_override: Any, caller: Any, subtests: Any) -> None:
    override_id = make_override()["id"]
    for endpoint, expected in READS.items():
        method, path = endpoint.split(" ")
        url = path.replace("{id}", str(override_id))
        for role in [None, *CALLERS]:
            with subtests.test(endpoint=endpoint, role=role):
                response = client.request(method, url, headers=caller(role))
                status = 401 if role is None else expected[role]
                if status == 200:
                    assert response.status_code == 200, response.text
                else:
                    assert_problem(response, status)
                if status == 401:
                    assert response.headers["www-authenticate"].startswith("Bearer")


def test_actions_role_matrix_with_refusals_audited(
    client: Any, engine: Engine, auth: Any, make_override: Any, caller: Any, subtests: Any
) -> None:
    serial = iter(range(1000))
    for action, (state, expected) in ACTIONS.items():
        for role in [None, *CALLERS]:
            with subtests.test(action=action, role=role):
                body: dict[str, Any] = {**COMMENT, "duration": "P1D"} if action == "extend" else dict(COMMENT)
                if action == "create":
                    url = "/v1/overrides"
                    body = {
                        "destination": f"m{next(serial)}.example",
                        "policy": "encrypt",
                        "justification": "Recipient TLSA records are stale after a rollover.",
                    }
                    override_id = None
                else:
                    override_id = make_override(destination=f"m{next(serial)}.example")["id"]
                    if state == "approved":
                        assert act(client, override_id, "approve", auth("carol", "approver")).status_code == 200
                    url = f"/v1/overrides/{override_id}/{action}"
                refusals = len(audit_rows(engine, "auth.refused"))
                response = client.post(url, json=body, headers=caller(role))
                status = 401 if role is None else expected[role]
                if status in {200, 201}:
                    assert response.status_code == status, response.text
                    continue
                assert_problem(response, status)
                refused = audit_rows(engine, "auth.refused")
                if status in {403, 404}:  # 404: not even visible to the caller, yet the attempt is on record
                    assert len(refused) == refusals + 1
                    row = refused[-1]
                    assert row["actor"] == CALLERS[str(role)][0] and row["override_id"] == override_id
                    assert row["comment"]
                else:  # no identity (401): nothing to attribute
                    assert len(refused) == refusals


def test_refused_action_details_in_the_audit_trail(client: Any, make_override: Any, auth: Any) -> None:
    override_id = make_override()["id"]
    assert_problem(act(client, override_id, "approve", auth("erin", "auditor")), 403)
    response = client.get("/v1/audit", params={"action": "auth.refused"}, headers=auth("erin", "auditor"))
    [row] = response.json()["items"]
    assert row["actor"] == "erin" and row["override_id"] == override_id
    assert row["after"] == {"attempted": "approve", "roles": ["auditor"]}


def test_wrong_role_on_a_decided_request_is_still_refused_and_audited(
    client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    """Authorisation comes before the state: an auditor learns nothing and the attempt is recorded."""
    override_id = make_override()["id"]
    assert act(client, override_id, "reject", auth("bob", "approver")).status_code == 200
    for action in ("approve", "reject"):
        assert_problem(act(client, override_id, action, auth("erin", "auditor")), 403)
    assert [r["actor"] for r in audit_rows(engine, "auth.refused")] == ["erin", "erin"]


# ---------------------------------------------------------------------------------------------------------------
# JWT attacks: each one is a 401 problem, whatever the token claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _claims(idp: DevIdentityProvider, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": idp.issuer,
        "aud": idp.audience,
        "sub": "mallory",
        "roles": ["admin"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def _signed(idp: DevIdentityProvider, key: ECKey | None = None, kid: str | None = None, **changes: Any) -> str:
    key = key or idp.key
    header = {"alg": "ES256", "kid": kid or key.kid}
    return jwt.encode(header, _claims(idp, **changes), key)


def _hmac_token(idp: DevIdentityProvider, secret: bytes) -> str:
    signing_input = _b64(json.dumps({"alg": "HS256", "kid": idp.key.kid}).encode()) + "."
    signing_input += _b64(json.dumps(_claims(idp)).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def _tampered(idp: DevIdentityProvider) -> str:
    header, _, signature = _signed(idp, roles=["requester"]).split(".")
    return f"{header}.{_b64(json.dumps(_claims(idp, roles=['admin'])).encode())}.{signature}"


NONE_HEADER = json.dumps({"alg": "none", "typ": "JWT"}).encode()

ATTACKS: dict[str, Callable[[DevIdentityProvider], str]] = {
    "wrong issuer": lambda idp: _signed(idp, iss="https://evil.example/dev"),
    "wrong audience": lambda idp: _signed(idp, aud="someone-else"),
    "expired": lambda idp: _signed(idp, exp=int(time.time()) - 120, iat=int(time.time()) - 720),
    "not yet valid": lambda idp: _signed(idp, nbf=int(time.time()) + 600),
    "no expiry": lambda idp: _signed(idp, exp=None),
    "no subject": lambda idp: _signed(idp, sub=None),
    "alg none": lambda idp: f"{_b64(NONE_HEADER)}.{_b64(json.dumps(_claims(idp)).encode())}.",
    "HS256 with the public key PEM": lambda idp: _hmac_token(idp, idp.key.as_pem(private=False)),
    "HS256 with the JWKS text": lambda idp: _hmac_token(
        idp, json.dumps({"keys": [idp.key.as_dict(private=False)]}).encode()
    ),
    "unknown kid": lambda idp: _signed(idp, key=ECKey.generate_key("P-256", auto_kid=True)),
    "known kid, another key": lambda idp: _signed(idp, key=ECKey.generate_key("P-256"), kid=idp.key.kid),
    "tampered payload": _tampered,
    "garbage": lambda idp: "not-a-jwt",
    "three garbage parts": lambda idp: "a.b.c",
}


@pytest.mark.parametrize("backend", ["sqlite"])  # tokens are checked before any database work
def test_jwt_attacks_are_refused(client: Any, idp: DevIdentityProvider, auth: Any, subtests: Any) -> None:
    assert client.get("/v1/overrides", headers=auth("alice", "requester")).status_code == 200  # the honest path
    for name, forge in ATTACKS.items():
        with subtests.test(attack=name):
            response = client.get("/v1/overrides", headers={"Authorization": f"Bearer {forge(idp)}"})
            body = assert_problem(response, 401)
            assert body["type"].endswith("/unauthenticated")
            assert "invalid_token" in response.headers["www-authenticate"]


@pytest.mark.parametrize("backend", ["sqlite"])  # tokens are checked before any database work
def test_small_clock_skew_is_tolerated(client: Any, idp: DevIdentityProvider) -> None:
    token = _signed(idp, nbf=int(time.time()) + 5)  # within the 30 s leeway
    assert client.get("/v1/overrides", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"])  # tokens are checked before any database work
def test_other_schemes_and_empty_tokens_are_401(client: Any, subtests: Any) -> None:
    for value in ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer ", "bearer"):
        with subtests.test(header=value):
            assert_problem(client.get("/v1/overrides", headers={"Authorization": value}), 401)


# ---------------------------------------------------------------------------------------------------------------
# X-On-Behalf-Of


def test_on_behalf_of_from_a_non_integration_is_refused(
    client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    override_id = make_override()["id"]
    before = counts(engine)
    response = act(client, override_id, "approve", auth("bob", "approver", on_behalf_of="carol"))
    assert_problem(response, 403)
    assert_problem(client.get("/v1/overrides", headers=auth("alice", "requester", on_behalf_of="bob")), 403)
    after = counts(engine)
    assert after["vote"] == before["vote"] and after["override"] == before["override"]
    [refused] = audit_rows(engine, "auth.refused")  # the attempted action is on record; the read is not
    assert refused["actor"] == "bob" and refused["override_id"] == override_id


def test_integration_acts_for_a_user_and_both_are_recorded(
    client: Any, make_override: Any, auth: Any, engine: Engine
) -> None:
    bot_for = lambda user: auth("bot", "integration", client_id="ticketing", on_behalf_of=user)  # noqa: E731
    response = client.post(
        "/v1/overrides",
        json={
            "destination": "example.net",
            "policy": "may",
            "justification": "Ticket OPS-9: recipient's TLSA records are stale.",
        },
        headers=bot_for("alice"),
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["requested_by"], created["requested_via"]) == ("alice", "ticketing")
    approved = act(client, created["id"], "approve", bot_for("bob"))
    assert approved.status_code == 200, approved.text
    assert approved.json()["approvals"][0]["via"] == "ticketing"
    trail = events(client, created["id"], auth("erin", "auditor"))
    assert [(e["action"], e["actor"], e["via"]) for e in trail] == [
        ("override.created", "alice", "ticketing"),
        ("vote.approve", "bob", "ticketing"),
        ("override.approved", "bob", "ticketing"),
    ]


@pytest.mark.parametrize("backend", ["sqlite"])  # tokens are checked before any database work
def test_on_behalf_of_must_name_a_user(client: Any, auth: Any, subtests: Any) -> None:
    for value in ("   ", "x" * 201, "bob\tsmith"):
        with subtests.test(value=value):
            headers = auth("bot", "integration", client_id="ticketing")
            headers["X-On-Behalf-Of"] = value
            assert_problem(client.get("/v1/overrides", headers=headers), 422, field="header.X-On-Behalf-Of")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_system_is_not_a_name_anyone_can_take(client: Any, auth: Any, idp: Any) -> None:
    headers = auth("bot", "integration", client_id="ticketing", on_behalf_of="System")
    assert_problem(client.get("/v1/overrides", headers=headers), 422, field="header.X-On-Behalf-Of")
    assert_problem(client.get("/v1/overrides", headers=auth("system", "admin")), 401)


def test_an_integration_cannot_make_up_a_quorum_or_an_alias(
    client: Any, make_override: Any, auth: Any, engine: Engine
) -> None:
    # A review bot: its own token grants approver, so it reads every request (not only its own submissions).
    bot_for = lambda user: auth("bot", "integration", "approver", client_id="slackbot", on_behalf_of=user)  # noqa: E731
    two = make_override("alice", policy="none")  # `none` needs two approvals
    assert act(client, two["id"], "approve", bot_for("ghost-1")).status_code == 200
    assert_problem(act(client, two["id"], "approve", bot_for("ghost-2")), 403)  # not the bot's second word
    done = act(client, two["id"], "approve", auth("carol", "approver"))  # a reviewer acting directly
    assert done.status_code == 200 and done.json()["state"] == "approved"

    one = make_override("alice", destination="example.net")
    assert_problem(act(client, one["id"], "approve", bot_for("Alice")), 403)  # alice's own, by another spelling
    assert_problem(act(client, one["id"], "approve", bot_for(" ALICE ")), 403)
    refusals = [e for e in events(client, one["id"], auth("erin", "auditor")) if e["action"] == "auth.refused"]
    assert [e["actor"] for e in refusals] == ["Alice", "ALICE"]  # on record as the integration named them


def test_roles_are_checked_before_the_version(client: Any, make_override: Any, auth: Any, engine: Engine) -> None:
    override_id = make_override("alice")["id"]
    stale = auth("dave", "requester") | {"If-Match": '"99"'}
    assert_problem(act(client, override_id, "approve", stale), 404)  # not dave's: invisible, but on record
    mallory = auth("mallory", "auditor") | {"If-Match": '"99"'}
    assert_problem(act(client, override_id, "approve", mallory), 403)  # a role problem, not a stale version
    refused = [row["actor"] for row in audit_rows(engine, "auth.refused")]
    assert refused == ["dave", "mallory"]


async def test_forged_kids_do_not_hammer_a_failing_identity_provider(settings: Any) -> None:
    import httpx

    from app.core.auth import TokenValidator
    from app.core.errors import AppError

    key = ECKey.generate_key("P-256", {"kid": "real"})
    calls = {"jwks": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": settings.oidc_issuer, "jwks_uri": "https://idp.test/jwks"})
        calls["jwks"] += 1
        if calls["jwks"] == 1:
            return httpx.Response(200, json={"keys": [key.as_dict(private=False)]})
        return httpx.Response(500)  # the provider fails from now on

    def forged(kid: str) -> str:
        header = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "kid": kid}).encode()).decode().rstrip("=")
        return f"{header}.e30.c2ln"

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        validator = TokenValidator(settings, http)

        async def storm() -> None:
            for n in range(20):
                with pytest.raises(AppError) as refused:
                    await validator.validate(forged(f"kid-{n}"))
                assert refused.value.status == 401

        await storm()
        assert calls["jwks"] == 1  # the first fetch; the unknown kids do not fetch again right away
        validator._cache.attempted_at -= settings.oidc_jwks_min_refresh_seconds + 1  # time passes
        await storm()
        assert calls["jwks"] == 2  # one refetch (it fails), not one per forged token
