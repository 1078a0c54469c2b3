"""The token validation cache: a token that passed is not checked again until its `exp`, and the cache never
outlives the JWKS it was checked against (a key removed from the JWKS stops validating at the next refresh,
at the latest `TLSO_OIDC_JWKS_MAX_AGE_SECONDS` after the last one)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from app.core import auth as auth_module
from app.core.auth import TokenValidator
from app.core.config import Settings
from app.core.errors import AppError
from tests.helpers import make_settings


@dataclass
class Provider:
    """A JWKS whose keys the test changes, and counts of what the validator asked for."""

    settings: Settings
    keys: list[ECKey] = field(default_factory=lambda: [ECKey.generate_key("P-256", {"kid": "one"})])
    fetches: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": self.settings.oidc_issuer, "jwks_uri": "https://idp.test/jwks"})
        self.fetches += 1
        return httpx.Response(200, json={"keys": [key.as_dict(private=False) for key in self.keys]})

    def token(self, key: ECKey | None = None, **changes: Any) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        claims = {
            "iss": self.settings.oidc_issuer,
            "aud": self.settings.oidc_audience,
            "sub": "alice",
            "roles": ["requester"],
            "iat": now,
            "exp": now + 600,
        } | changes
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key)


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Provider, TokenValidator]]:
    settings = make_settings(oidc_token_cache_size=3)
    provider = Provider(settings)
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as http:
        yield provider, TokenValidator(settings, http)


def _age(validator: TokenValidator) -> None:
    """Time passes: the JWKS was fetched `TLSO_OIDC_JWKS_MAX_AGE_SECONDS` ago."""
    validator._cache.fetched_at -= validator.settings.oidc_jwks_max_age_seconds
    validator._cache.attempted_at -= validator.settings.oidc_jwks_max_age_seconds


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens whose signature was checked (the full validation)."""
    seen: list[str] = []
    decode = auth_module.jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(auth_module.jwt, "decode", counting)
    return seen


async def test_a_valid_token_is_checked_once_until_it_expires(
    setup: tuple[Provider, TokenValidator], checks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, validator = setup
    token = provider.token(exp=int(time.time()) + 60)
    first = await validator.validate(token)
    assert await validator.validate(token) == first and first["sub"] == "alice"
    assert checks == [token]  # the second time from the cache
    later = time.time() + 60 + validator.settings.oidc_leeway_seconds + 1
    monkeypatch.setattr(auth_module.time, "time", lambda: later)
    with pytest.raises(AppError) as refused:  # past exp (and the leeway): checked in full again, and refused
        await validator.validate(token)
    assert refused.value.status == 401 and len(checks) == 2


async def test_a_signature_on_another_payload_is_not_taken_from_the_cache(
    setup: tuple[Provider, TokenValidator], checks: list[str]
) -> None:
    provider, validator = setup
    token = provider.token()
    await validator.validate(token)
    header, _, signature = token.split(".")
    admin = {**json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==")), "roles": ["admin"]}
    payload = base64.urlsafe_b64encode(json.dumps(admin).encode()).decode().rstrip("=")
    with pytest.raises(AppError) as refused:
        await validator.validate(f"{header}.{payload}.{signature}")
    assert refused.value.status == 401


async def test_a_key_removed_from_the_jwks_stops_validating_at_the_next_refresh(
    setup: tuple[Provider, TokenValidator], checks: list[str]
) -> None:
    provider, validator = setup
    token = provider.token()
    await validator.validate(token)
    await validator.validate(token)
    assert provider.fetches == 1
    provider.keys = [ECKey.generate_key("P-256", {"kid": "two"})]  # the provider drops key "one"
    await validator.validate(token)  # until the JWKS is refreshed, as without a cache
    _age(validator)  # the JWKS is now too old
    with pytest.raises(AppError) as refused:
        await validator.validate(token)
    assert refused.value.status == 401 and provider.fetches == 2
    assert await validator.validate(provider.token()) is not None  # the new key's tokens pass


async def test_a_refreshed_jwks_checks_remembered_tokens_again(
    setup: tuple[Provider, TokenValidator], checks: list[str]
) -> None:
    provider, validator = setup
    token = provider.token()
    await validator.validate(token)
    _age(validator)
    await validator.validate(token)  # same key still there: valid, but checked in full against the new JWKS
    assert provider.fetches == 2 and checks == [token, token]


async def test_the_cache_is_bounded_and_can_be_turned_off(
    setup: tuple[Provider, TokenValidator], checks: list[str]
) -> None:
    provider, validator = setup
    tokens = [provider.token(sub=f"user{i}") for i in range(5)]
    for token in tokens:
        await validator.validate(token)
    assert len(validator.validated) == 3  # TLSO_OIDC_TOKEN_CACHE_SIZE
    await validator.validate(tokens[0])  # the oldest went first
    assert checks.count(tokens[0]) == 2
    off = TokenValidator(make_settings(oidc_token_cache_size=0), validator.http)
    token = provider.token()
    await off.validate(token)
    await off.validate(token)
    assert len(off.validated) == 0 and checks.count(token) == 2


async def test_the_caller_of_a_token_is_made_once_while_it_is_recently_used(
    setup: tuple[Provider, TokenValidator],
) -> None:
    provider, validator = setup
    tokens = [provider.token(sub=f"user{n}", name=f"User {n}") for n in range(5)]
    first = validator.principal(tokens[0], await validator.validate(tokens[0]))
    assert first.actor == "user0" and first.name == "User 0" and first.roles == frozenset({"requester"})
    assert validator.principal(tokens[0], await validator.validate(tokens[0])) is first
    for token in tokens[1:]:  # bounded like the token cache (3 here): the least recently used goes first
        validator.principal(token, await validator.validate(token))
    again = validator.principal(tokens[0], await validator.validate(tokens[0]))
    assert again == first and again is not first


async def test_a_remembered_token_is_not_read_again(
    setup: tuple[Provider, TokenValidator], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, validator = setup
    token = provider.token()
    await validator.validate(token)
    reads: list[bytes] = []
    extract = auth_module.extract_compact

    def counting(value: bytes, *args: Any, **kwargs: Any) -> Any:
        reads.append(value)
        return extract(value, *args, **kwargs)

    monkeypatch.setattr(auth_module, "extract_compact", counting)
    assert (await validator.validate(token))["sub"] == "alice"
    assert reads == []  # from the cache: not even its header is parsed
    _age(validator)
    await validator.validate(token)  # a JWKS due for a refresh: read and checked in full again
    assert reads == [token.encode()] and provider.fetches == 2
