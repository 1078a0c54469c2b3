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
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tlsoverride.dev/problems/"

log = logging.getLogger("app.errors")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending input, e.g. `body.parameters`.")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(description=f"What kind of problem: a URI under `{TYPE_BASE}`, one per kind (see each status).")
    title: str = Field(description="The kind of problem in words; the same for every problem of a `type`.")
    status: int = Field(description="The HTTP status code, repeated.")
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="Field-level explanations.")
    existing: str | None = Field(default=None, description="URL of the conflicting resource, if any.")


class AppError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"
    example = "An unexpected error occurred."  # a typical `detail`, shown in the OpenAPI document

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


class MalformedBody(AppError):
    status, type, title = 400, "malformed-body", "The request body cannot be read"
    example = "The body is not valid JSON: Expecting ',' delimiter (line 1, column 12)."


class InvalidInput(AppError):
    status, type, title = 422, "validation", "Invalid input"
    example = "body.duration: months and years have no fixed length: give days, e.g. P30D"

    @classmethod
    def on(cls, field: str, message: str) -> InvalidInput:
        return cls(message, errors=[FieldError(field=field, message=message)])


class Unauthenticated(AppError):
    status, type, title = 401, "unauthenticated", "Authentication required"
    example = "A bearer token is required."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class SlackRequestRefused(AppError):
    """Not a request from Slack: no or a wrong signature, too old, or one seen before (a replay)."""

    status, type, title = 401, "slack-signature", "Not a valid request from Slack"
    example = "The request's X-Slack-Signature does not match its body and timestamp."


class Forbidden(AppError):
    status, type, title = 403, "forbidden", "Not allowed"
    example = "This needs one of the roles: auditor, admin."


class NotFound(AppError):
    status, type, title = 404, "not-found", "Not found"
    example = "Override 42 does not exist."


class MethodNotAllowed(AppError):
    status, type, title = 405, "method-not-allowed", "Method not allowed"
    example = "DELETE is not allowed here; allowed: GET, POST."


class Conflict(AppError):
    status, type, title = 409, "conflict", "Conflict"
    example = "bob already voted 'approve' on this request."


class InvalidTransition(AppError):
    status, type, title = 409, "invalid-transition", "Not possible in the current state"
    example = "An override in state 'rejected' never changes again."


class PreconditionFailed(AppError):
    status, type, title = 412, "precondition-failed", "The resource has changed"
    example = "The override is at version 4; reload it and decide again."


class PreconditionRequired(AppError):
    status, type, title = 428, "precondition-required", "If-Match header required"
    example = "Send If-Match with the override's ETag."


class IdempotencyMismatch(AppError):
    status, type, title = 422, "idempotency-key-reused", "Idempotency-Key reused with a different request"
    example = "Idempotency-Key was first used for a different request."


class TooManyRequests(AppError):
    status, type, title = 429, "rate-limited", "Too many requests"
    example = "At most 30 diagnoses a minute; try again in 12 s."


class ServiceUnavailable(AppError):
    status, type, title = 503, "unavailable", "Service unavailable"
    example = "The identity provider's keys cannot be fetched."


class DatabaseUnavailable(ServiceUnavailable):
    type, title = "database-unavailable", "Database unavailable"
    example = "The database cannot be reached; try again shortly."

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


def _malformed_json(exc: RequestValidationError) -> MalformedBody | None:
    """FastAPI reports an unparseable JSON body as a validation error; it is a 400, not a 422."""
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "it cannot be parsed")
            position = err.get("loc", ("body", "?"))[-1]
            return MalformedBody(f"The body is not valid JSON: {reason} (at character {position}).")
    return None


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str | None:
    """Every method some route answers at this path: Starlette's own 405 names only the first route's,
    and two routes often share a path (`GET` and `POST /v1/overrides`). Mounts answer for themselves."""
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return ", ".join(allowed) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return problem_response(exc.problem(request.url.path), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        malformed = _malformed_json(exc)
        if malformed is not None:
            return problem_response(malformed.problem(request.url.path))
        errors = [
            FieldError(field=_field_path(err.get("loc", ())), message=str(err.get("msg", "invalid")))
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
        return problem_response(InvalidInput(detail, errors=errors).problem(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own refusals (no route, wrong method, unreadable body) as our problems."""
        headers = dict(exc.headers or {})
        error: AppError | None = None
        if exc.status_code == 400:
            error = MalformedBody(str(exc.detail))
        elif exc.status_code == 404:
            error = NotFound(f"There is nothing at {request.url.path}.")
        elif exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
            error = MethodNotAllowed(f"{request.method} is not allowed here; allowed: {headers['Allow']}.")
        if error is not None:
            return problem_response(error.problem(request.url.path), headers)
        status = HTTPStatus(exc.status_code)
        problem = Problem(
            type=TYPE_BASE + status.phrase.lower().replace(" ", "-"),
            title=status.phrase,
            status=exc.status_code,
            detail=str(exc.detail) if exc.detail != status.phrase else None,
            instance=request.url.path,
        )
        return problem_response(problem, headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unreachable(exc):
            raise exc  # a failed statement is a bug: the handler for unexpected errors answers 500
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc.orig or exc)
        error = DatabaseUnavailable()
        return problem_response(error.problem(request.url.path), error.headers)

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
        # Every connection busy for the pool's whole wait: the database is too slow to answer, not the request.
        log.warning("no database connection on %s %s: %s", request.method, request.url.path, exc)
        error = DatabaseUnavailable()
        return problem_response(error.problem(request.url.path), error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(AppError("An unexpected error occurred.").problem(request.url.path))


# Every problem type the API sends, documented with its status, title and a typical detail.
PROBLEM_TYPES: tuple[type[AppError], ...] = (
    MalformedBody,
    Unauthenticated,
    SlackRequestRefused,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    InvalidTransition,
    PreconditionFailed,
    InvalidInput,
    IdempotencyMismatch,
    PreconditionRequired,
    TooManyRequests,
    AppError,
    ServiceUnavailable,
    DatabaseUnavailable,
)

_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'The bearer challenge: `Bearer error="invalid_token"`.',
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds until a new attempt can succeed.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds until the cause ends, when that is known (a mailcow target paused after "
            "an authentication failure).",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def _example(kind: type[AppError]) -> dict[str, Any]:
    value: dict[str, Any] = {
        "type": TYPE_BASE + kind.type,
        "title": kind.title,
        "status": kind.status,
        "detail": kind.example,
    }
    if kind is InvalidInput:
        field, _, message = kind.example.partition(": ")
        value["errors"] = [{"field": field, "message": message}]
    return {"summary": kind.title, "value": value}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the problem+json errors a route can return, with an example of
    each problem type of that status."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        kinds = [kind for kind in PROBLEM_TYPES if kind.status == status]
        if not kinds:
            raise ValueError(f"no problem type is documented for status {status}")
        types = ", ".join(f"`{kind.type}`" for kind in kinds)
        response: dict[str, Any] = {
            "description": f"{HTTPStatus(status).phrase} (problem type {types}).",
            "content": {
                PROBLEM_JSON: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "examples": {kind.type: _example(kind) for kind in kinds},
                }
            },
        }
        if status in _PROBLEM_HEADERS:
            response["headers"] = _PROBLEM_HEADERS[status]
        responses[status] = response
    return responses


def problem_schemas() -> dict[str, Any]:
    """`Problem` and `FieldError` for the OpenAPI components (the responses above refer to them)."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    definitions: dict[str, Any] = schema.pop("$defs", {})
    return {**definitions, "Problem": schema}
