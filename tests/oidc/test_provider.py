"""Smoke test of the test OpenID provider fixture: real tokens, validated with joserfc against its JWKS."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import ExpiredTokenError
from joserfc.jwk import KeySet

from tests.oidc.fixtures import (
    DEFAULT_CLIENT_GROUPS,
    DEFAULT_USER_GROUPS,
    SHORT_TTL,
    SHORT_TTL_CLIENT,
    OidcProvider,
    OidcProviderError,
    require_oidc_provider,
    run_oidc_provider,
)


def validate(provider: OidcProvider, token: str, **options: Any) -> dict[str, Any]:
    keys = KeySet.import_key_set(provider.jwks())  # type: ignore[arg-type]
    decoded = jwt.decode(token, keys, algorithms=["RS256", "ES256"])
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.header["alg"] == provider.alg
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": provider.issuer},
        aud={"essential": True, "value": provider.audience},
        exp={"essential": True},
        sub={"essential": True},
        **options,
    ).validate(decoded.claims)
    return decoded.claims


@pytest.mark.parametrize("client_id", ["svc-ticketing", "svc-reader"])
def test_client_credentials_token(oidc_provider: OidcProvider, client_id: str) -> None:
    claims = validate(oidc_provider, oidc_provider.client_credentials_token(client_id))
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["groups"] == DEFAULT_CLIENT_GROUPS[client_id]
    assert claims["scope"] == "api:read api:write"
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.parametrize("username", sorted(DEFAULT_USER_GROUPS))
def test_user_token(oidc_provider: OidcProvider, username: str) -> None:
    claims = validate(oidc_provider, oidc_provider.user_token(username))
    assert claims["sub"] == claims["preferred_username"] == username
    assert claims["client_id"] == "swagger-ui"
    assert claims["groups"] == DEFAULT_USER_GROUPS[username]
    assert claims["name"]
    assert set(claims["scope"].split()) >= {"api:read", "api:write"}


def test_user_token_with_swagger_default_scopes(oidc_provider: OidcProvider) -> None:
    """Swagger UI asks for OIDC scopes only: the token is still for the API (aud), but carries no `scope`."""
    tokens = oidc_provider.user_tokens("bob", scope="openid profile groups")
    claims = validate(oidc_provider, tokens.access_token)
    assert claims["groups"] == ["tlso-approvers"]
    assert "scope" not in claims
    assert tokens.id_token
    keys = KeySet.import_key_set(oidc_provider.jwks())  # type: ignore[arg-type]
    id_claims = jwt.decode(tokens.id_token, keys).claims
    assert id_claims["aud"] == "swagger-ui"
    assert id_claims["groups"] == ["tlso-approvers"]
    # The access token is for the API, not for the provider's own userinfo endpoint.
    info = httpx.get(oidc_provider.userinfo_url, headers={"Authorization": f"Bearer {tokens.access_token}"})
    assert info.status_code == 401


def test_unknown_login_has_no_groups(oidc_provider: OidcProvider) -> None:
    claims = validate(oidc_provider, oidc_provider.user_token("mallory"))
    assert claims["groups"] == []


def test_short_ttl_client_expires(oidc_provider: OidcProvider) -> None:
    claims = validate(oidc_provider, oidc_provider.client_credentials_token(SHORT_TTL_CLIENT))
    assert claims["exp"] - claims["iat"] == SHORT_TTL
    registry = jwt.JWTClaimsRegistry(now=claims["iat"] + SHORT_TTL + 1, exp={"essential": True})
    with pytest.raises(ExpiredTokenError):
        registry.validate(claims)


def test_refusals(oidc_provider: OidcProvider) -> None:
    with pytest.raises(OidcProviderError, match="invalid_client"):
        oidc_provider.client_credentials_token("svc-ticketing", secret="wrong")
    response = oidc_provider.client_credentials_response("svc-reader", resource="https://elsewhere.example")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


def test_es256_and_custom_config() -> None:
    require_oidc_provider()
    with run_oidc_provider(
        alg="ES256",
        audience="tlsoverride",  # not a URI: the resource indicator becomes urn:tlsoverride:api
        users={"zoe": {"groups": ["g-zoe"], "name": "Zoe"}},
        clients={"svc-x": {"groups": ["g-x"], "secret": "s3cret"}},
        env={"OIDC_GROUPS_CLAIM": "roles"},
    ) as provider:
        machine = validate(provider, provider.client_credentials_token("svc-x", secret="s3cret"))
        assert machine["roles"] == ["g-x"]
        assert machine["aud"] == "tlsoverride"
        user = validate(provider, provider.user_token("zoe"))
        assert user["roles"] == ["g-zoe"]
        assert user["name"] == "Zoe"


def test_the_login_page_loads_nothing_from_beyond_loopback(oidc_provider: OidcProvider) -> None:
    """oidc-provider's own pages @import a web font from a CDN; provider.mjs cuts that out (the browser
    test asserts that no request leaves 127.0.0.1)."""
    params = {
        "client_id": oidc_provider.swagger_client_id,
        "response_type": "code",
        "redirect_uri": oidc_provider.redirect_uri,
        "scope": "openid",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
        "prompt": "login",
    }
    with httpx.Client(follow_redirects=True, timeout=10) as browser:
        page = browser.get(oidc_provider.authorization_url, params=params)
    assert page.status_code == 200 and 'name="login"' in page.text
    assert "fonts.googleapis.com" not in page.text and "@import" not in page.text
    assert not re.search(r"""(src|href|action)=["']?(https?:)?//(?!127\.0\.0\.1[:/])""", page.text), page.text
