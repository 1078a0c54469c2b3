"""Typed errors and their RFC 9457 `application/problem+json` rendering."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tlsoverride.dev/problems/"

log = logging.getLogger("app.errors")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending input, e.g. `body.parameters`.")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=[TYPE_BASE + "validation"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="Field-level explanations.")
    existing: str | None = Field(default=None, description="URL of the conflicting resource, if any.")


class AppError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[FieldError] | None = None,
        existing: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = errors
        self.existing = existing
        self.headers = headers or {}

    def problem(self, instance: str | None = None) -> Problem:
        return Problem(
            type=TYPE_BASE + self.type,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
            existing=self.existing,
        )


class InvalidInput(AppError):
    status, type, title = 422, "validation", "Invalid input"

    @classmethod
    def on(cls, field: str, message: str) -> InvalidInput:
        return cls(message, errors=[FieldError(field=field, message=message)])


class Unauthenticated(AppError):
    status, type, title = 401, "unauthenticated", "Authentication required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Forbidden(AppError):
    status, type, title = 403, "forbidden", "Not allowed"


class NotFound(AppError):
    status, type, title = 404, "not-found", "Not found"


class Conflict(AppError):
    status, type, title = 409, "conflict", "Conflict"


class InvalidTransition(AppError):
    status, type, title = 409, "invalid-transition", "Not possible in the current state"


class PreconditionFailed(AppError):
    status, type, title = 412, "precondition-failed", "The resource has changed"


class PreconditionRequired(AppError):
    status, type, title = 428, "precondition-required", "If-Match header required"


class IdempotencyMismatch(AppError):
    status, type, title = 422, "idempotency-key-reused", "Idempotency-Key reused with a different request"


class TooManyRequests(AppError):
    status, type, title = 429, "rate-limited", "Too many requests"


class ServiceUnavailable(AppError):
    status, type, title = 503, "unavailable", "Service unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    type, title = "database-unavailable", "Database unavailable"

    def __init__(self) -> None:
        super().__init__("The database cannot be reached; try again shortly.", headers={"Retry-After": "5"})


def database_unreachable(exc: BaseException) -> bool:
    """Whether a database error means "the server is not there" (refused, shut down, connection lost)
    rather than a statement that failed; only the former is a 503."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    # PostgreSQL: class 08 (connection exception) and 57P (shutdown, cannot connect now); a failed
    # connection attempt has no SQLSTATE at all. SQLite's operational errors carry none either.
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or str(sqlstate).startswith(("08", "57P"))


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return problem_response(exc.problem(request.url.path), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            FieldError(field=_field_path(err.get("loc", ())), message=str(err.get("msg", "invalid")))
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
        return problem_response(InvalidInput(detail, errors=errors).problem(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        problem = Problem(
            type=TYPE_BASE + status.phrase.lower().replace(" ", "-"),
            title=status.phrase,
            status=exc.status_code,
            detail=str(exc.detail) if exc.detail != status.phrase else None,
            instance=request.url.path,
        )
        return problem_response(problem, dict(exc.headers or {}))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unreachable(exc):
            raise exc  # a failed statement is a bug: the handler for unexpected errors answers 500
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc.orig or exc)
        error = DatabaseUnavailable()
        return problem_response(error.problem(request.url.path), error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(AppError("An unexpected error occurred.").problem(request.url.path))


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problem+json errors a route can return."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
