"""Shared fixtures: real databases built by Alembic (SQLite and PostgreSQL), isolated per test,
an app wired to the dev identity provider (real JWT validation), and small factories.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from app.core.config import Settings
from app.core.db import make_engine
from app.core.devidp import DevIdentityProvider, DevTokenRequest
from app.core.migrations import upgrade
from app.main import create_app
from tests.helpers import ISSUER, VALID_REQUEST, Headers, LiveServer, make_settings

# The DNSSEC/SMTP lab (`dane_lab`) and the real OpenID provider (`oidc_provider`) are session fixtures;
# `private_postgres` is a PostgreSQL cluster of its own for tests that stop the server; `standin` and
# `standin_app` are the mailcow stand-in (devtools/), `served_standin` the same over real HTTP.
pytest_plugins = ["tests.lab.fixtures", "tests.oidc.fixtures", "tests.private_postgres", "tests.standin"]

# Property tests judge answers, not speed: on a loaded 2-core CI machine one example of 1,000 can take longer
# than Hypothesis' default 200 ms deadline, which fails the test for nothing (speed is measured in bench/).
hypothesis_settings.register_profile("tlso", deadline=None)
hypothesis_settings.load_profile("tlso")

PG_ADMIN_URL = os.environ.get("TLSO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_TEMPLATE = f"tlso_tpl_{os.getpid()}"


def _pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def _pg_admin() -> Engine:
    # No pool: a connection kept from before a server restart (test_worker_faults) would be dead.
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _pg_url(database: str) -> str:
    return str(sa.make_url(PG_ADMIN_URL).set(database=database))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    if not _pg_available():
        if os.environ.get("TLSO_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required but not reachable at {PG_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{PG_TEMPLATE}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{PG_TEMPLATE}"'))
    engine = make_engine(_pg_url(PG_TEMPLATE))
    upgrade(engine)
    engine.dispose()
    yield PG_TEMPLATE
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{PG_TEMPLATE}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database per test, copied from a template that Alembic built once."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "test.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    name = f"tlso_t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"'))
    yield _pg_url(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def idp() -> DevIdentityProvider:
    return DevIdentityProvider(ISSUER)


@pytest.fixture
def app(settings: Settings, engine: Engine, idp: DevIdentityProvider) -> FastAPI:
    return create_app(settings, engine=engine, dev_idp=idp)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def auth(idp: DevIdentityProvider) -> Callable[..., Headers]:
    """`auth("alice", "requester")` → Authorization headers for that person and roles."""

    def make(sub: str, *roles: str, client_id: str | None = None, on_behalf_of: str | None = None) -> Headers:
        token = idp.mint(DevTokenRequest(sub=sub, name=sub.title(), roles=list(roles), client_id=client_id))  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {token}"}
        if on_behalf_of:
            headers["X-On-Behalf-Of"] = on_behalf_of
        return headers

    return make


@pytest.fixture
def make_override(client: TestClient, auth: Callable[..., Headers]) -> Callable[..., dict[str, Any]]:
    """Create an override as `requester` (default alice) and return its JSON."""

    def make(requester: str = "alice", **fields: Any) -> dict[str, Any]:
        body = {**VALID_REQUEST, **fields}
        response = client.post("/v1/overrides", json=body, headers=auth(requester, "requester"))
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    return make


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server
