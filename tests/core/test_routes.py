"""The routes on the app itself (app/core/routes.py): the same answers, byte for byte, as the routers included
the way FastAPI includes them, and no work per request for what only documents the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import OAuth2AuthorizationCodeBearer
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

import app.main
from app.core.auth import CurrentPrincipal, require
from app.core.config import Settings
from app.core.devidp import DevIdentityProvider
from app.core.routes import include_flat
from app.main import create_app
from tests.helpers import Headers


def _included(application: FastAPI, router: APIRouter, **options: Any) -> None:
    application.include_router(router, **options)


@pytest.fixture
def nested(
    settings: Settings, engine: Engine, idp: DevIdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The same app with its routers included by FastAPI, each solving every dependency it declares."""
    monkeypatch.setattr(app.main, "include_flat", _included)
    with TestClient(create_app(settings, engine=engine, dev_idp=idp), raise_server_exceptions=False) as client:
        yield client


def _included_routers(client: TestClient) -> int:
    return sum(type(route).__name__ == "_IncludedRouter" for route in client.app.router.routes)  # type: ignore[attr-defined]


def test_the_app_has_no_included_router(client: TestClient, nested: TestClient) -> None:
    assert (_included_routers(client), _included_routers(nested) > 5) == (0, True)


def test_answers_are_those_of_the_included_routers(
    client: TestClient, nested: TestClient, make_override: Callable[..., dict[str, Any]], auth: Callable[..., Headers]
) -> None:
    override_id = make_override()["id"]
    reviewer, requester = auth("bob", "approver"), auth("alice", "requester")
    bot = auth("bot", "integration", client_id="ticketing")
    token = reviewer["Authorization"].removeprefix("Bearer ")
    requests: list[tuple[str, str, Headers]] = [
        ("GET", f"/v1/overrides/{override_id}", reviewer),
        ("GET", f"/v1/overrides/{override_id}", requester),
        ("GET", f"/v1/overrides/{override_id}", auth("carol", "requester")),  # not hers: 404
        ("GET", f"/v1/overrides/{override_id}", {}),
        ("GET", f"/v1/overrides/{override_id}", {"Authorization": f"Basic {token}"}),
        ("GET", f"/v1/overrides/{override_id}", {"Authorization": "Bearer "}),
        ("GET", f"/v1/overrides/{override_id}", {"Authorization": "Bearer"}),
        ("GET", f"/v1/overrides/{override_id}", {"Authorization": f"bearer   {token}  "}),
        ("GET", f"/v1/overrides/{override_id}", {"Authorization": "Bearer not.a.jwt"}),
        ("GET", f"/v1/overrides/{override_id}", reviewer | {"X-On-Behalf-Of": "carol"}),  # not an integration
        ("GET", f"/v1/overrides/{override_id}", reviewer | {"X-On-Behalf-Of-Name": "Carol"}),
        ("GET", f"/v1/overrides/{override_id}", bot | {"X-On-Behalf-Of": "alice"}),
        ("GET", f"/v1/overrides/{override_id}", bot | {"X-On-Behalf-Of": ""}),
        ("GET", f"/v1/overrides/{override_id}", bot | {"X-On-Behalf-Of": "alice", "X-On-Behalf-Of-Name": ""}),
        ("GET", f"/v1/overrides/{override_id}", bot | {"X-On-Behalf-Of": "jos%C3%A9"}),
        ("GET", f"/v1/overrides/{override_id}", bot),
        ("GET", "/v1/overrides/0", reviewer),
        ("GET", "/v1/overrides/abc", reviewer),
        ("GET", "/v1/overrides/999999", reviewer),
        ("DELETE", f"/v1/overrides/{override_id}", reviewer),
        ("GET", f"/v1/overrides/{override_id}/events", requester),
        ("GET", "/v1/overrides?state=pending", reviewer),
        ("GET", "/v1/overrides?limit=0", reviewer),
        ("GET", "/v1/me", bot | {"X-On-Behalf-Of": "carol", "X-On-Behalf-Of-Name": "Carol C."}),
        ("GET", "/v1/audit", requester),
        ("GET", "/v1/audit", auth("erin", "auditor")),
        ("GET", "/v1/targets", reviewer),
        ("POST", "/v1/overrides", {}),
        ("POST", f"/v1/overrides/{override_id}/approve", {}),
        ("GET", "/metrics", {}),
        ("GET", "/healthz", {}),
        ("GET", "/nothing-here", {}),
        ("GET", "/docs", {}),
    ]
    for method, path, headers in requests:
        flat, included = client.request(method, path, headers=headers), nested.request(method, path, headers=headers)
        assert (flat.status_code, flat.headers.multi_items(), flat.content) == (
            included.status_code,
            included.headers.multi_items(),
            included.content,
        ), f"{method} {path} {headers}"


def test_the_openapi_document_is_that_of_the_included_routers(client: TestClient, nested: TestClient) -> None:
    assert client.get("/openapi.json").content == nested.get("/openapi.json").content


class _CountingScheme(OAuth2AuthorizationCodeBearer):
    calls = 0

    async def __call__(self, request: Request) -> str | None:
        _CountingScheme.calls += 1
        return await super().__call__(request)


def test_a_scheme_that_only_documents_is_not_run(
    settings: Settings, engine: Engine, idp: DevIdentityProvider, auth: Callable[..., Headers]
) -> None:
    application = create_app(settings, engine=engine, dev_idp=idp)
    scheme = _CountingScheme(authorizationUrl="/auth", tokenUrl="/token", scheme_name="login", auto_error=False)
    router = APIRouter()

    @router.get("/probe", dependencies=[require("admin")])
    async def probe(principal: CurrentPrincipal) -> dict[str, str]:
        return {"actor": principal.actor}

    include_flat(application, router, dependencies=[Depends(scheme)])
    route = next(r for r in application.router.routes if isinstance(r, APIRoute) and r.path == "/probe")
    assert route.dependant.dependencies[0].call is scheme  # documented ...
    with TestClient(application, raise_server_exceptions=False) as client:
        assert client.get("/probe").status_code == 401
        assert client.get("/probe", headers=auth("alice", "requester")).status_code == 403
        answer = client.get("/probe", headers=auth("root", "admin"))
        assert (answer.status_code, answer.json()) == (200, {"actor": "root"})
        assert "login" in client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert _CountingScheme.calls == 0  # ... and never run
