"""The dev identity provider's login for Swagger UI: `/dev/auth` (a login page under a strict CSP) →
a one-time code for this app's own redirect page → `/dev/token` with PKCE S256. Never outside dev mode."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.core import devidp
from app.core.devidp import LOGIN_PAGE_POLICY, DevIdentityProvider, s256
from app.main import create_app
from tests.helpers import ISSUER, assert_problem, make_settings

REDIRECT = "http://testserver/docs/oauth2-redirect"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _authorize_params(challenge: str, **changes: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": "swagger-ui",
        "redirect_uri": REDIRECT,
        "scope": "openid profile groups",
        "state": "st-" + secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "prompt": "login",
    }
    params.update(changes)
    return {key: value for key, value in params.items() if value != "<absent>"}


def _log_in(client: TestClient, verifier: str, sub: str = "bob", roles: tuple[str, ...] = ("approver",)) -> str:
    """The login page's form posted as a browser would; returns the code from the redirect."""
    params = _authorize_params(s256(verifier))
    page = client.get("/dev/auth", params=params)
    assert page.status_code == 200, page.text
    form: dict[str, Any] = {key: value for key, value in params.items() if key not in ("scope", "prompt")}
    form.update(sub=sub, name=sub.title(), roles=list(roles))
    answer = client.post("/dev/auth", data=form, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [params["state"]] and query["iss"] == [ISSUER]
    return query["code"][0]


def _redeem(client: TestClient, code: str, verifier: str, **changes: str) -> Any:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": "swagger-ui",
        **changes,
    }
    return client.post("/dev/token", data=form)


def test_the_login_page_is_a_form_without_script_under_its_own_strict_policy(client: TestClient) -> None:
    page = client.get("/dev/auth", params=_authorize_params(s256("v" * 43), state='"><script>alert(1)</script>'))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == LOGIN_PAGE_POLICY
    assert "script-src" not in LOGIN_PAGE_POLICY and "form-action 'self'" in LOGIN_PAGE_POLICY
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert "<script" not in html and "&quot;&gt;&lt;script&gt;" in html  # the state is carried, escaped
    assert '<form method="post" action="/dev/auth">' in html
    for role in ("requester", "approver", "admin", "auditor", "integration"):
        assert f'name="roles" value="{role}"' in html


def test_swagger_ui_login_ends_in_a_token_with_the_chosen_user_and_roles(client: TestClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _log_in(client, verifier, "bob", ("approver", "auditor"))
    answer = _redeem(client, code, verifier)
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == devidp.LOGIN_TOKEN_TTL_SECONDS
    assert answer.headers["cache-control"] == "no-store"
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    assert client.get("/v1/overrides", headers=headers).status_code == 200  # approver: sees all
    assert client.get("/v1/audit/verify", headers=headers).status_code == 200  # auditor


def test_a_code_is_good_once(client: TestClient) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _log_in(client, verifier)
    assert _redeem(client, code, verifier).status_code == 200
    again = _redeem(client, code, verifier)
    body = assert_problem(again, 400)
    assert body["error"] == "invalid_grant" and "used" in body["error_description"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"code_verifier": secrets.token_urlsafe(48)}, "code_verifier"),  # not the verifier of the challenge
        ({"redirect_uri": "http://testserver/elsewhere"}, "redirect_uri"),
        ({"client_id": "someone-else"}, "client_id"),
    ],
)
def test_a_code_needs_its_verifier_redirect_uri_and_client_and_is_gone_after_a_wrong_try(
    client: TestClient, changes: dict[str, str], field: str
) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _log_in(client, verifier)
    refused = assert_problem(_redeem(client, code, verifier, **changes), 400, field=f"body.{field}")
    assert refused["error"] == "invalid_grant"
    # A guess burns the code: the right verifier does not help afterwards.
    assert _redeem(client, code, verifier).json()["error"] == "invalid_grant"


def test_a_code_expires(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _log_in(client, verifier)
    later = devidp.time.monotonic() + devidp.CODE_TTL_SECONDS + 1
    monkeypatch.setattr(devidp.time, "monotonic", lambda: later)
    assert _redeem(client, code, verifier).json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"redirect_uri": "https://attacker.example/docs/oauth2-redirect"}, "redirect_uri"),
        ({"redirect_uri": "http://testserver/docs/oauth2-redirect?x=1"}, "redirect_uri"),
        ({"client_id": "other"}, "client_id"),
        ({"response_type": "token"}, "response_type"),
        ({"code_challenge_method": "plain"}, "code_challenge"),
        ({"code_challenge": "<absent>"}, "code_challenge"),
    ],
)
def test_the_login_page_refuses_what_is_not_this_apps_swagger_ui_with_pkce(
    client: TestClient, changes: dict[str, str], field: str
) -> None:
    params = _authorize_params(s256("v" * 43), **changes)
    assert_problem(client.get("/dev/auth", params=params), 422, field=f"query.{field}")
    form = {**params, "sub": "mallory", "roles": "admin"}
    posted = client.post("/dev/auth", data=form, follow_redirects=False)
    assert_problem(posted, 422, field=f"body.{field}")
    assert "location" not in posted.headers  # never a redirect to an unchecked place


def test_the_login_form_checks_the_user_and_roles(client: TestClient) -> None:
    params = _authorize_params(s256("v" * 43))
    posted = client.post("/dev/auth", data={**params, "sub": "bob", "roles": "superuser"}, follow_redirects=False)
    assert_problem(posted, 422, field="body.roles.0")
    posted = client.post("/dev/auth", data={**params, "sub": " ", "roles": "approver"}, follow_redirects=False)
    assert_problem(posted, 422, field="body.sub")


def test_the_token_endpoint_refuses_other_grants(client: TestClient) -> None:
    refused = client.post("/dev/token", data={"grant_type": "password", "username": "bob", "password": "x"})
    assert assert_problem(refused, 400)["error"] == "unsupported_grant_type"
    # The JSON form that scripts use is unchanged.
    minted = client.post("/dev/token", json={"sub": "alice", "roles": ["requester"]})
    assert minted.status_code == 200 and minted.json()["access_token"].count(".") == 2
    assert_problem(client.post("/dev/token", json={"sub": "", "roles": ["requester"]}), 422, field="body.sub")
    malformed = client.post("/dev/token", content=b"{bad", headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_problem(malformed, 400)["detail"]


def test_discovery_names_the_login_and_pkce(client: TestClient) -> None:
    doc = client.get("/dev/.well-known/openid-configuration").json()
    assert doc["authorization_endpoint"] == f"{ISSUER}/auth" and doc["token_endpoint"] == f"{ISSUER}/token"
    assert doc["code_challenge_methods_supported"] == ["S256"] and doc["response_types_supported"] == ["code"]


def test_swagger_ui_asks_the_provider_to_log_someone_in_every_time(client: TestClient) -> None:
    html = client.get("/docs").text
    assert '"additionalQueryStringParams": {"prompt": "login"}' in html


def test_the_prompt_can_be_turned_off(engine: Any) -> None:
    settings = make_settings(oidc_swagger_prompt="")
    with TestClient(create_app(settings, engine=engine, dev_idp=DevIdentityProvider(ISSUER))) as client:
        assert "additionalQueryStringParams" not in client.get("/docs").text


@pytest.mark.parametrize("path", ["/dev/auth", "/dev/token", "/dev/jwks", "/dev/.well-known/openid-configuration"])
def test_without_dev_mode_there_is_no_dev_path(engine: Any, path: str, auth: Callable[..., Any]) -> None:
    settings = make_settings(env="production", oidc_issuer="https://idp.example.net/realms/mail")
    app = create_app(settings, engine=engine)
    assert not [route for route in app.routes if getattr(route, "path", "").startswith("/dev")]
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_problem(client.get(path), 404)
        assert client.post(path, data={"grant_type": "authorization_code"}).status_code in (404, 405)
