"""Problems the framework and the database raise before or beside our code: an unreadable body, no route, a
wrong method, an unreachable database (503 with Retry-After; a failing statement stays a 500)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.core.errors import install_error_handlers
from tests.helpers import assert_problem, counts


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{", "application/json"),
        (b'{"destination": "example.org",}', "application/json"),
        (b"\xff\xfe{}", "application/json"),  # not UTF-8
        (b"{", "application/problem+json"),  # any +json type is read as JSON
    ],
)
def test_unparseable_body_is_400(
    client: TestClient, engine: Engine, auth: Any, make_override: Any, body: bytes, content_type: str
) -> None:
    override_id = make_override()["id"]
    before = counts(engine)
    for path in ("/v1/overrides", f"/v1/overrides/{override_id}/approve"):
        response = client.post(path, content=body, headers={**auth("bob", "approver"), "Content-Type": content_type})
        problem = assert_problem(response, 400)
        assert problem["type"].endswith("/malformed-body"), problem
        assert problem["instance"] == path
    assert counts(engine) == before


def test_malformed_json_names_where(client: TestClient, auth: Any) -> None:
    headers = {**auth("alice", "requester"), "Content-Type": "application/json"}
    problem = assert_problem(client.post("/v1/overrides", content=b'{"a": 1,,}', headers=headers), 400)
    assert "not valid JSON" in problem["detail"] and "character 8" in problem["detail"], problem


def test_valid_json_of_the_wrong_shape_is_still_422(client: TestClient, auth: Any) -> None:
    headers = {**auth("alice", "requester"), "Content-Type": "application/json"}
    assert_problem(client.post("/v1/overrides", content=b"[1, 2]", headers=headers), 422, field="body")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/overrides", "GET, POST"),  # two routes share the path: both methods are named
        ("PUT", "/v1/overrides", "GET, POST"),
        ("PATCH", "/v1/overrides/1", "GET"),
        ("GET", "/v1/overrides/1/approve", "POST"),
        ("POST", "/v1/audit", "GET"),
        ("OPTIONS", "/docs", "GET"),
        ("POST", "/openapi.json", "GET, HEAD"),
        ("POST", "/static/swagger-ui/swagger-ui.css", "GET, HEAD"),  # the static files answer for themselves
    ],
)
def test_wrong_method_is_405_with_every_allowed_method(
    client: TestClient, auth: Any, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path, headers=auth("alice", "requester"))
    problem = assert_problem(response, 405)
    assert problem["type"].endswith("/method-not-allowed")
    assert response.headers["allow"] == allowed
    assert method in problem["detail"] and allowed in problem["detail"]


def test_unknown_path_is_a_not_found_problem(client: TestClient) -> None:
    problem = assert_problem(client.get("/v2/nothing"), 404)
    assert problem["type"].endswith("/not-found") and problem["instance"] == "/v2/nothing"


def test_metrics_refusals_are_documented(client: TestClient, auth: Any) -> None:
    """The scrape runs the same caller checks as the API, so it can answer 422 as well as 401 and 403."""
    from app.cli import canonical_openapi

    documented = set(canonical_openapi()["paths"]["/metrics"]["get"]["responses"])
    reserved = client.get("/metrics", headers=auth("scraper", "integration", client_id="prom", on_behalf_of="system"))
    assert_problem(reserved, 422)
    assert_problem(client.get("/metrics"), 401)
    assert_problem(client.get("/metrics", headers=auth("alice", "requester")), 403)
    assert {"401", "403", "422", "503"} <= documented


def _failing_app(error: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    return TestClient(app, raise_server_exceptions=False)


def _pg_error(cls: type[psycopg.Error], sqlstate: str | None) -> psycopg.Error:
    error = cls("server said no")
    error.sqlstate = sqlstate  # type: ignore[misc]  (set by the server on real errors)
    return error


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT 1", {}, _pg_error(psycopg.OperationalError, None)),  # refused
        OperationalError("SELECT 1", {}, _pg_error(psycopg.errors.AdminShutdown, "57P01")),
        OperationalError("SELECT 1", {}, _pg_error(psycopg.errors.ConnectionFailure, "08006")),
        InterfaceError("SELECT 1", {}, psycopg.InterfaceError("the connection is closed")),
        PoolTimeout("QueuePool limit of size 10 overflow 10 reached, server said no"),  # every connection busy
    ],
    ids=["refused", "admin-shutdown", "connection-failure", "closed", "pool-exhausted"],
)
def test_an_unreachable_database_is_a_503(error: Exception) -> None:
    response = _failing_app(error).get("/boom")
    body = assert_problem(response, 503)
    assert body["type"].endswith("/database-unavailable") and response.headers["retry-after"] == "5"
    assert "server said no" not in response.text  # the driver's message stays in the log


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT 1", {}, _pg_error(psycopg.errors.DeadlockDetected, "40P01")),
        OperationalError("SELECT 1", {}, _pg_error(psycopg.errors.QueryCanceled, "57014")),
    ],
    ids=["deadlock", "statement-timeout"],
)
def test_a_failed_statement_is_still_a_500(error: Exception) -> None:
    assert_problem(_failing_app(error).get("/boom"), 500)


def test_a_failed_statement_names_none_of_its_values(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Statements carry people's words (justifications, names, tickets): a failed one's error, and so the
    log line of an unexpected error, names the statement but none of its values (`make_engine`)."""
    words = "the recipient's admin, Jane Roe, said so on the phone"
    with pytest.raises(sa.exc.DBAPIError) as failed, engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :words)"), {"words": words})
    with caplog.at_level(logging.ERROR):
        assert_problem(_failing_app(failed.value).get("/boom"), 500)
    [logged] = [record for record in caplog.records if record.getMessage().startswith("unhandled error")]
    text = logging.Formatter().format(logged)  # with its traceback
    assert "INSERT INTO audit_head" in text and words not in text, text  # the head is there: IntegrityError
