"""The app's routes as one flat list, each request solving only the dependencies that do something.

FastAPI keeps an included router as a route of its own that matches its routes in turn: a request is
matched at every level of nesting, and again at each level when it is handled. `include_flat` puts a
router's routes on the app itself instead, with what `include_router` would add (dependencies first,
responses merged under the route's own), so a request walks one list once. The OpenAPI document is the
same (tests/test_openapi.py compares it byte for byte).

Some dependencies are there for the OpenAPI document only. A security scheme that never refuses
(`auto_error=False`) and whose value no parameter takes documents a login (the Swagger UI's OIDC login);
`current_principal` declares the bearer token and the identity headers so that every route documents
them, and reads them from the request. A `Route` answers its requests with a copy of its dependencies
without the former and with `caller` in place of the latter: the same answers, without FastAPI solving
three more dependencies and two header parameters on every request.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant
from fastapi.params import Depends
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase

from app.core.auth import caller, current_principal

# A dependency whose parameters only document what it reads → the function that reads it from the request.
RUNS_AS: dict[Callable[..., Any], Callable[..., Any]] = {current_principal: caller}

# Settings of a route or a dependant that only newer FastAPI versions have (pyproject's floor lacks them):
# carried over where this version has them, so the flat routes are the same on every version allowed.
_ROUTE_EXTRAS = ("strict_content_type", "max_body_size")
_ADDS = inspect.signature(APIRouter.add_api_route).parameters
_DEPENDANT_EXTRAS = ("concurrency",)
_GETS = inspect.signature(get_dependant).parameters


def _documents_only(dependant: Dependant) -> bool:
    """A security scheme that never refuses and whose value nobody takes: it changes no answer."""
    return (
        dependant.name is None
        and isinstance(dependant.call, SecurityBase)
        and getattr(dependant.call, "auto_error", True) is False
        and not dependant.dependencies
    )


def _to_run(dependant: Dependant) -> Dependant:
    """`dependant` as requests solve it: without what only documents it, `RUNS_AS` in place."""
    kept = []
    for sub in dependant.dependencies:
        if _documents_only(sub):
            continue
        runs_as = RUNS_AS.get(sub.call) if sub.call is not None else None
        if runs_as is not None:
            kept.append(
                get_dependant(
                    path=sub.path or "",
                    call=runs_as,
                    name=sub.name,
                    use_cache=sub.use_cache,
                    scope=sub.scope,
                    **{extra: getattr(sub, extra) for extra in _DEPENDANT_EXTRAS if extra in _GETS},
                )
            )
        else:
            kept.append(_to_run(sub))
    return dataclasses.replace(dependant, dependencies=kept)


class Route(APIRoute):
    """An API route that documents its dependencies as declared and solves them as `_to_run` leaves them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        documented = self.dependant
        self.dependant = _to_run(documented)
        try:
            return super().get_route_handler()
        finally:
            self.dependant = documented


def include_flat(
    app: FastAPI,
    router: APIRouter,
    *,
    dependencies: Sequence[Depends] = (),
    responses: dict[int | str, dict[str, Any]] | None = None,
) -> None:
    """`app.include_router(router, dependencies=..., responses=...)`, with the routes on the app itself."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"{route!r}: only API routes are included flat")
        app.router.add_api_route(
            route.path,
            route.endpoint,
            response_model=route.response_model,
            status_code=route.status_code,
            tags=route.tags,
            dependencies=[*dependencies, *route.dependencies],
            summary=route.summary,
            description=route.description,
            response_description=route.response_description,
            responses={**(responses or {}), **route.responses},
            deprecated=route.deprecated,
            methods=route.methods,
            operation_id=route.operation_id,
            response_model_include=route.response_model_include,
            response_model_exclude=route.response_model_exclude,
            response_model_by_alias=route.response_model_by_alias,
            response_model_exclude_unset=route.response_model_exclude_unset,
            response_model_exclude_defaults=route.response_model_exclude_defaults,
            response_model_exclude_none=route.response_model_exclude_none,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class,
            name=route.name,
            route_class_override=Route,
            callbacks=route.callbacks,
            openapi_extra=route.openapi_extra,
            generate_unique_id_function=route.generate_unique_id_function,
            **{extra: getattr(route, extra) for extra in _ROUTE_EXTRAS if extra in _ADDS},
        )
