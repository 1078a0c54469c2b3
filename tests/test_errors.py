"""Database errors as problem documents: an unreachable database is a 503 with Retry-After; a statement
that fails is still a 500 (a bug, not an outage)."""

from __future__ import annotations

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.errors import install_error_handlers
from tests.helpers import assert_problem


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
    ],
    ids=["refused", "admin-shutdown", "connection-failure", "closed"],
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
