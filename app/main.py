"""create_app(): the API process — routers, error handlers, auth, docs, lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp

from app import __version__
from app.audit.refusals import record_refusal
from app.audit.router import router as audit_router
from app.audit.signing import trusted_keys
from app.core.auth import TokenValidator, oauth2_scheme
from app.core.config import Settings
from app.core.db import close_async_reads, make_engine
from app.core.devidp import LOGIN_PAGE_POLICY, DevIdentityProvider
from app.core.errors import (
    ServiceUnavailable,
    install_error_handlers,
    problem_response,
    problem_responses,
    problem_schemas,
)
from app.core.me import router as me_router
from app.core.metrics import metrics_router
from app.core.routes import include_flat
from app.core.security_headers import SecurityHeaders, page_policy
from app.diagnosis.budget import RateLimiter, RecentDiagnoses
from app.diagnosis.router import router as diagnosis_router
from app.gauges import database_gauges
from app.notify.router import document_webhooks
from app.notify.router import router as notifications_router
from app.overrides.router import router as overrides_router
from app.slack.router import router as slack_router
from app.slack.service import slack_users
from app.targets.queue import queue_on_create
from app.targets.router import router as targets_router

log = logging.getLogger("app")
STATIC = Path(__file__).parent / "static"

DESCRIPTION = """
Temporary, approved and audited TLS policy overrides for mailcow, for recipient domains whose
DANE/TLSA records are broken. Engineers request an override with a justification and an expiry;
reviewers approve or reject (never their own); a worker applies it through the mailcow API and
removes it when it ends. Every step lands in a hash-chained audit trail.

Errors are RFC 9457 `application/problem+json`: each status lists its problem types, with an example.
Besides those, any path answers a method it does not offer with 405 and an `Allow` header naming the
methods it does. Actions accept `If-Match` (the override's ETag) and `Idempotency-Key`; both are described
with the operations that read them.
"""


class Api(FastAPI):
    """FastAPI with the security headers outside everything (so 500 answers carry them too) and the
    problem schemas in its OpenAPI document."""

    security_pages: dict[str, str] = {}  # path → Content-Security-Policy of the HTML pages (set by create_app)

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), pages=self.security_pages)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = super().openapi()  # generated once and kept in self.openapi_schema
            document.setdefault("components", {}).setdefault("schemas", {}).update(problem_schemas())
        return super().openapi()


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    dev_idp: DevIdentityProvider | None = None,
    oidc_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    if dev_idp is not None and settings.env == "production":
        raise RuntimeError("the dev identity provider mints tokens for anyone: never with TLSO_ENV=production")
    # No pre-ping in the API: it is a round trip on every request. A connection the server dropped fails its
    # request once (503 problem+json, app/core/errors.py), and SQLAlchemy then replaces every pooled connection
    # older than that failure, so the API serves again by itself (tests/test_drills.py).
    engine = engine or make_engine(settings.database_url, pre_ping=False)
    scheme = oauth2_scheme(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.oidc_http.aclose()
        await close_async_reads(app.state)

    app = Api(
        title="tlsoverride",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        swagger_ui_init_oauth={
            "clientId": settings.oidc_swagger_client_id,
            "usePkceWithAuthorizationCodeGrant": True,
            "scopes": settings.oidc_swagger_scopes,
            "appName": "tlsoverride",
            **(
                {"additionalQueryStringParams": {"prompt": settings.oidc_swagger_prompt}}
                if settings.oidc_swagger_prompt
                else {}
            ),
        },
    )
    app.state.settings = settings
    app.state.engine = engine
    if dev_idp is not None:
        # Dev mode validates its own tokens through HTTP discovery + JWKS, served by this same app.
        oidc_transport = httpx.ASGITransport(app=app)
    app.state.oidc_http = httpx.AsyncClient(transport=oidc_transport, timeout=10.0, follow_redirects=False)
    app.state.token_validator = TokenValidator(settings, app.state.oidc_http)

    def refusal_on_record(**fields: Any) -> None:
        record_refusal(app.state.engine, app.state.settings, **fields)

    app.state.record_refusal = refusal_on_record  # core.auth records refused identities through it
    # Both live in the database: every replica of the API keeps one budget per caller and one cache.
    app.state.diagnosis_limiter = RateLimiter(engine, settings.diagnosis_rate_per_minute)
    app.state.recent_diagnoses = RecentDiagnoses(engine)
    app.state.queue_reader = queue_on_create  # a new request's mail queue evidence (overrides cannot import targets)
    app.state.audit_keys = trusted_keys(settings)  # a malformed key stops the start, not a later request
    slack_users(settings)  # so does a malformed Slack user map
    install_error_handlers(app)

    # The OAuth2 scheme only documents the Swagger UI login; tokens are checked by current_principal.
    # Every authenticated route can also answer 403 (X-On-Behalf-Of from a non-integration), 503 (the
    # identity provider's keys cannot be fetched) and 500 (a bug: still a problem document).
    # The probes first: routes are matched in order, and a probe should not walk past every API route.
    # Every router's routes go on the app itself, in one list (app/core/routes.py).
    include_flat(app, health_router())
    login, answers = [Depends(scheme)], problem_responses(403, 500, 503)
    for router in (me_router, overrides_router, audit_router, diagnosis_router, targets_router, notifications_router):
        include_flat(app, router, dependencies=login, responses=answers)
    include_flat(app, slack_router)
    document_webhooks(app)
    include_flat(app, metrics_router(database_gauges))
    if dev_idp is not None:
        include_flat(app, dev_idp.router())
    app.security_pages = _mount_docs(app, settings)
    if dev_idp is not None:
        app.security_pages["/dev/auth"] = LOGIN_PAGE_POLICY
    return app


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        # `async def`: nothing here blocks, so no hop to the thread pool and back on every probe.
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Database reachable and migrated to head",
        responses={200: {"description": "Ready"}, **problem_responses(503)},
    )
    def readyz(request: Request) -> JSONResponse:
        from app.core.migrations import current_and_head

        try:
            with request.app.state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current, head = current_and_head(request.app.state.engine)
        except Exception as exc:  # any failure means "not ready"; the reason is logged, not leaked
            log.warning("readiness check failed: %s", exc)
            return problem_response(ServiceUnavailable("The database is unreachable.").problem("/readyz"))
        if current != head:
            return problem_response(
                ServiceUnavailable(f"The database schema is at {current}, not at {head}: run migrations.").problem(
                    "/readyz"
                )
            )
        return JSONResponse({"status": "ok", "database": "ok", "migration": current})

    return router


def _mount_docs(app: FastAPI, settings: Settings) -> dict[str, str]:
    """Swagger UI served from this process (no CDN), with OIDC login (code + PKCE) and bearer paste.
    Both pages are rendered once; their Content-Security-Policies (by path) allow exactly their scripts."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title="tlsoverride — API",
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
        init_oauth=app.swagger_ui_init_oauth,
        # No validator badge: it would send the document's URL to validator.swagger.io.
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True, "validatorUrl": None},
    )
    redirect = get_swagger_ui_oauth2_redirect_html()

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return HTMLResponse(page.body)

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return HTMLResponse(redirect.body)

    # The login's token request goes from the page to the identity provider.
    token_url = urlsplit(settings.oidc_token_url or f"{settings.oidc_issuer.rstrip('/')}/token")
    provider = [f"{token_url.scheme}://{token_url.netloc}"] if token_url.netloc else []
    return {
        "/docs": page_policy(bytes(page.body), connect_to=provider),
        "/docs/oauth2-redirect": page_policy(bytes(redirect.body)),
    }
