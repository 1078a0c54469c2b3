"""The checked-in OpenAPI document is the code's, documents its errors, and Swagger UI is served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import OPENAPI_FILE, canonical_openapi, render_openapi
from app.core.db import make_engine
from app.core.errors import PROBLEM_JSON
from app.main import create_app
from tests.conftest import make_settings

# What each kind of operation can answer besides success.
ACTION_ERRORS = {"401", "403", "404", "409", "412", "422", "428"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return canonical_openapi()


@pytest.fixture(scope="module")
def docs_client() -> Iterator[TestClient]:
    engine = make_engine("sqlite://")
    with TestClient(create_app(make_settings(), engine=engine)) as client:
        yield client
    engine.dispose()


def test_checked_in_document_is_current() -> None:
    assert OPENAPI_FILE.read_text(encoding="utf-8") == render_openapi(), "run `python -m app openapi`"


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_every_operation_documents_its_problems(spec: dict[str, Any], subtests: Any) -> None:
    assert "HTTPValidationError" not in str(spec)  # FastAPI's default 422 shape is never what we send
    for method, path, operation in _operations(spec):
        with subtests.test(operation=f"{method} {path}"):
            responses = operation["responses"]
            assert operation.get("summary")
            for status, response in responses.items():
                if not status.startswith("2"):
                    schema = response["content"][PROBLEM_JSON]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, status
            if not path.startswith("/v1/"):
                continue
            assert {"401", "422"} <= set(responses), "authenticated and validated"
            if path.startswith("/v1/audit"):
                assert "403" in responses
            if method == "POST" and "{override_id}" in path:
                assert set(responses) >= ACTION_ERRORS
            if method == "POST" and path == "/v1/overrides":
                assert {"403", "409"} <= set(responses)
            if "{override_id}" in path:
                assert "404" in responses


def test_security_schemes_offer_oidc_and_bearer(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    flow = schemes["oidc"]["flows"]["authorizationCode"]
    assert flow["authorizationUrl"] == "https://idp.example.com/auth"
    assert flow["tokenUrl"] == "https://idp.example.com/token"
    assert schemes["bearer"]["scheme"] == "bearer"


def test_served_document_matches_the_code(docs_client: TestClient, spec: dict[str, Any]) -> None:
    served = docs_client.get("/openapi.json").json()
    assert served["paths"].keys() == spec["paths"].keys()


def test_swagger_ui_is_self_hosted_with_pkce_login(docs_client: TestClient) -> None:
    response = docs_client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in html and "/static/swagger-ui/swagger-ui.css" in html
    assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
    assert "/docs/oauth2-redirect" in html
    assert '"usePkceWithAuthorizationCodeGrant": true' in html and '"clientId": "swagger-ui"' in html
    redirect = docs_client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "oauth2" in redirect.text.lower()
