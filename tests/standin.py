"""The mailcow stand-in (devtools/mailcow_standin.py) as the tests use it: a pytest plugin (registered in
tests/conftest.py) with its fixtures — `standin_app`, `standin`, `served_standin` — and helpers imported
by name: the keys, a client on it, a real socket, its rows, calls and faults."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.mailcow.client import MailcowClient
from devtools.mailcow_standin import Fault, MailcowStandin, StandinKey, create_standin_app
from tests.helpers import LiveServer

KEY = "ABCDEF-012345-6789AB-CDEF01-234567"
RO_KEY = "FEDCBA-012345-6789AB-CDEF01-234567"
JSON = {"Content-Type": "application/json"}
AUTH = {"X-API-Key": KEY, "Content-Type": "application/json"}
RO = {"X-API-Key": RO_KEY, "Content-Type": "application/json"}
BASE = "http://mailcow.test"
ADD = "/api/v1/add/tls-policy-map"
EDIT = "/api/v1/edit/tls-policy-map"
DELETE = "/api/v1/delete/tls-policy-map"
ALL = "/api/v1/get/tls-policy-map/all"
MAILQ = "/api/v1/get/mailq/all"
EDIT_MAILQ = "/api/v1/edit/mailq"


def make_app(extra: list[StandinKey] | None = None) -> Starlette:
    return create_standin_app([StandinKey(KEY), StandinKey(RO_KEY, access="ro"), *(extra or [])])


def standin_of(app: Starlette) -> MailcowStandin:
    standin: MailcowStandin = app.state.standin
    return standin


class NoCookies(CookieJar):
    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


@asynccontextmanager
async def raw(app: Starlette, *, keep_cookies: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client on the stand-in; stateless unless `keep_cookies` (the pitfall)."""
    jar: CookieJar | None = None if keep_cookies else NoCookies()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, cookies=jar) as client:
        yield client


def mailcow_client(app: Starlette, key: str = KEY, **kwargs: Any) -> MailcowClient:
    kwargs.setdefault("backoff_initial", 0.001)
    kwargs.setdefault("backoff_max", 0.005)
    return MailcowClient(BASE, key, transport=httpx.ASGITransport(app=app), **kwargs)


@contextmanager
def served(app: Starlette) -> Iterator[str]:
    """Run `app` under a real uvicorn on a free loopback port in a thread; yields the base URL."""
    with LiveServer(app, lifespan="off") as server:
        yield server.url


def mailcow_rows(standin: MailcowStandin) -> dict[str, dict[str, Any]]:
    rows = standin.rows()
    by_dest = {row["dest"]: row for row in rows}
    assert len(by_dest) == len(rows)
    return by_dest


def calls(standin: MailcowStandin, *ops: str) -> list[dict[str, Any]]:
    return [call for call in standin.calls if not ops or call["op"] in ops]


def fault(standin: MailcowStandin, op: str, mode: str, count: int = 1) -> None:
    standin.add_fault(Fault(op=op, mode=mode, count=count))


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


def assert_no_forbidden_queue_calls(standin: MailcowStandin) -> None:
    """mailcow's `flush`, `super_delete` and `delete/mailq` must never be sent (mailcow-api.md §12)."""
    forbidden = standin.queue.forbidden
    assert not forbidden, f"forbidden mail queue calls reached the stand-in: {forbidden}"


@pytest.fixture
def standin_app() -> Iterator[Starlette]:
    app = create_standin_app([StandinKey(KEY)])
    yield app
    assert_no_forbidden_queue_calls(standin_of(app))


@pytest.fixture
def standin(standin_app: Starlette) -> MailcowStandin:
    return standin_of(standin_app)


ServedStandin = LiveServer  # the stand-in over real HTTP; stop() and start() again make mailcow unreachable


@pytest.fixture
def served_standin(standin_app: Starlette) -> Iterator[ServedStandin]:
    served = LiveServer(standin_app, lifespan="off")
    served.start()
    yield served
    served.stop()
