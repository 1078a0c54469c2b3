"""Every answer carries the security headers of its kind, errors and 404s included; the Swagger UI page
runs under a Content-Security-Policy that allows exactly its own scripts."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.security_headers import API_POLICY, page_policy
from tests.helpers import make_settings


def _policy(response: Any) -> dict[str, list[str]]:
    directives = [part.split() for part in response.headers["content-security-policy"].split(";")]
    return {directive[0]: directive[1:] for directive in directives if directive}


def _inline_script_hashes(html: str) -> set[str]:
    return {
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    }


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/openapi.json", 200),
        ("GET", "/v1/overrides", 200),
        ("GET", "/v1/overrides/999", 404),
        ("GET", "/v1/audit", 403),
        ("POST", "/v1/overrides", 422),
        ("DELETE", "/v1/overrides", 405),
        ("GET", "/nowhere", 404),
    ],
)
def test_api_answers_are_not_stored_nor_sniffed(
    client: TestClient, auth: Any, method: str, path: str, status: int
) -> None:
    response = client.request(method, path, headers=auth("alice", "requester"), json={})
    assert response.status_code == status, response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-security-policy"] == API_POLICY


def test_unauthenticated_answers_carry_them_too(client: TestClient) -> None:
    response = client.get("/v1/overrides")
    assert response.status_code == 401
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


@pytest.fixture
def crashing_client(app: FastAPI) -> Iterator[TestClient]:
    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_a_500_carries_them_too(crashing_client: TestClient) -> None:
    response = crashing_client.get("/boom")
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


def test_static_assets_may_be_cached(client: TestClient) -> None:
    response = client.get("/static/swagger-ui/swagger-ui.css")
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "cache-control" not in response.headers and response.headers["etag"]
    missing = client.get("/static/swagger-ui/missing.js")
    assert missing.status_code == 404 and missing.headers["x-content-type-options"] == "nosniff"


def test_docs_page_allows_exactly_its_inline_script(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    policy = _policy(response)
    hashes = _inline_script_hashes(response.text)
    assert len(hashes) == 1  # Swagger UI's start-up script, with the OIDC client settings
    assert set(policy["script-src"]) == {"'self'", *hashes}
    assert "'unsafe-inline'" not in str(policy) and "'unsafe-eval'" not in str(policy)
    assert policy["frame-ancestors"] == ["'none'"] and response.headers["x-frame-options"] == "DENY"
    assert policy["default-src"] == ["'none'"]
    assert policy["style-src"] == ["'self'"] and policy["img-src"] == ["'self'", "data:"]
    # The page fetches the document and the API here, and the login's token from the identity provider.
    assert policy["connect-src"] == ["'self'", "http://testserver"]
    assert response.headers["cache-control"] == "no-store"
    assert "validator.swagger.io" not in response.text and "validatorUrl" in response.text


def test_oauth2_redirect_page_allows_exactly_its_inline_script(client: TestClient) -> None:
    response = client.get("/docs/oauth2-redirect")
    policy = _policy(response)
    hashes = _inline_script_hashes(response.text)
    assert len(hashes) == 1 and set(policy["script-src"]) == {"'self'", *hashes}
    assert policy["frame-ancestors"] == ["'none'"] and policy["connect-src"] == ["'self'"]


def test_token_endpoint_origin_comes_from_the_settings() -> None:
    from app.main import create_app

    settings = make_settings(oidc_token_url="https://login.example.net:8443/oauth2/token")
    with TestClient(create_app(settings)) as client:
        policy = _policy(client.get("/docs"))
    assert policy["connect-src"] == ["'self'", "https://login.example.net:8443"]


def test_page_policy_hashes_every_inline_script_but_not_external_ones() -> None:
    html = b'<script src="/static/a.js"></script><script>one()</script><p>x</p><script>\ntwo()\n</script>'
    policy = page_policy(html)
    expected = {
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in (b"one()", b"\ntwo()\n")
    }
    script_src = next(part.split()[1:] for part in policy.split(";") if part.split()[0] == "script-src")
    assert set(script_src) == {"'self'", *expected}
