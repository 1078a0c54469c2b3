"""The checked-in OpenAPI document is the code's, documents its errors, and Swagger UI is served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import OPENAPI_FILE, canonical_openapi, render_openapi
from app.core.db import make_engine
from app.core.errors import PROBLEM_JSON, PROBLEM_TYPES, TYPE_BASE
from app.core.idempotency import KEY_MAX_LENGTH, KEY_PATTERN
from app.main import create_app
from tests.helpers import make_settings

# What each kind of operation can answer besides success.
ACTION_ERRORS = {"400", "401", "403", "404", "409", "412", "422", "428"}


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
                    assert set(response["content"]) == {PROBLEM_JSON}, "errors are never plain JSON"
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
                assert {"400", "403", "409"} <= set(responses)
            if "requestBody" in operation:
                assert "400" in responses, "an unparseable body"
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


def test_every_error_example_is_of_its_own_status(spec: dict[str, Any], subtests: Any) -> None:
    titles = {TYPE_BASE + kind.type: kind.title for kind in PROBLEM_TYPES}
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                continue
            with subtests.test(operation=f"{method} {path}", status=status):
                examples = response["content"][PROBLEM_JSON]["examples"]
                assert examples
                for name, example in examples.items():
                    value = example["value"]
                    assert value["status"] == int(status) and value["type"] == TYPE_BASE + name
                    assert value["title"] == titles[value["type"]] and value["detail"]
                    assert f"`{name}`" in response["description"]


def test_problem_types_are_distinct_and_the_validation_example_names_a_field() -> None:
    assert len({kind.type for kind in PROBLEM_TYPES}) == len(PROBLEM_TYPES)
    statuses = {kind.status for kind in PROBLEM_TYPES}
    assert {400, 401, 403, 404, 405, 409, 412, 422, 428, 429, 500, 503} <= statuses


def test_challenge_and_retry_headers_are_documented(spec: dict[str, Any]) -> None:
    get = spec["paths"]["/v1/overrides"]["get"]["responses"]
    assert get["401"]["headers"]["WWW-Authenticate"]["required"] is True
    diagnosis = spec["paths"]["/v1/diagnostics/{domain}"]["get"]["responses"]
    assert diagnosis["429"]["headers"]["Retry-After"]["required"] is True


def _header(operation: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in operation["parameters"] if p["in"] == "header" and p["name"] == name)


def test_request_headers_are_documented_with_their_limits(spec: dict[str, Any], subtests: Any) -> None:
    for method, path, operation in _operations(spec):
        if method != "POST" or not path.startswith("/v1/overrides"):
            continue
        with subtests.test(operation=f"{method} {path}"):
            key = _header(operation, "Idempotency-Key")
            string = next(s for s in key["schema"]["anyOf"] if s["type"] == "string")
            assert string["minLength"] == 1 and string["maxLength"] == KEY_MAX_LENGTH
            assert string["pattern"] == KEY_PATTERN
            for words in ("TLSO_IDEMPOTENCY_TTL", "Idempotent-Replayed", "idempotency-key-reused", "runs it again"):
                assert words in key["description"], words
            success = next(r for status, r in operation["responses"].items() if status.startswith("2"))
            assert "Idempotent-Replayed" in success["headers"] and "ETag" in success["headers"]
            if "{override_id}" in path:
                if_match = _header(operation, "If-Match")["description"]
                for words in ('W/"3"', "`*`", "412", "428", "TLSO_REQUIRE_IF_MATCH"):
                    assert words in if_match, words


def test_the_405_rule_is_stated(spec: dict[str, Any]) -> None:
    assert "405" in spec["info"]["description"] and "`Allow`" in spec["info"]["description"]


def test_links_chain_every_action_with_its_etag(spec: dict[str, Any]) -> None:
    actions = {path.rsplit("/", 1)[1] for path in spec["paths"] if path.startswith("/v1/overrides/{override_id}/")}
    actions.discard("events")
    sources = [
        spec["paths"]["/v1/overrides"]["post"]["responses"]["201"],
        spec["paths"]["/v1/overrides/{override_id}"]["get"]["responses"]["200"],
        spec["paths"]["/v1/overrides/{override_id}/approve"]["post"]["responses"]["200"],
    ]
    for response in sources:
        assert set(response["links"]) == actions
        for link in response["links"].values():
            path = link["operationRef"].removeprefix("#/paths/").removesuffix("/post").replace("~1", "/")
            assert "post" in spec["paths"][path]
            assert link["parameters"] == {
                "path.override_id": "$response.body#/id",
                "header.If-Match": "$response.header.ETag",
            }
