"""Liveness and readiness: /readyz is 200 only with a reachable database at the migration head."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.core.migrations import current_and_head
from app.main import create_app
from tests.helpers import make_settings


def test_healthz(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_at_head(client: Any, engine: Engine) -> None:
    _, head = current_and_head(engine)
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "database": "ok", "migration": head}


def test_readyz_not_migrated(client: Any, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'older'"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "at older, not at" in response.json()["detail"]
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
    response = client.get("/readyz")
    assert response.status_code == 503 and "at None, not at" in response.json()["detail"]


def test_readyz_database_unreachable(subtests: Any) -> None:
    engines = {
        "postgres": sa.create_engine(
            "postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
        ),
        "sqlite": sa.create_engine("sqlite:////proc/no-such-dir/tlso.db"),
    }
    for name, engine in engines.items():
        with subtests.test(backend=name), TestClient(create_app(make_settings(), engine=engine)) as client:
            response = client.get("/readyz")
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["detail"] == "The database is unreachable."  # no internals leak
            assert client.get("/healthz").status_code == 200  # alive, just not ready
        engine.dispose()


def test_metrics_need_an_admin_or_auditor_token(client: Any, auth: Any, subtests: Any) -> None:
    for who, headers, status in [
        ("no token", {}, 401),
        ("requester", auth("alice", "requester"), 403),
        ("approver", auth("bob", "approver"), 403),
        ("auditor", auth("carol", "auditor"), 200),
        ("admin", auth("root", "admin"), 200),
    ]:
        with subtests.test(who=who):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == status, response.text
            if status == 200:
                assert "tlso_database_up 1.0" in response.text
            else:
                assert response.headers["content-type"] == "application/problem+json"


def test_metrics_can_be_opened_for_a_private_scraper(engine: Engine, idp: Any) -> None:
    app = create_app(make_settings(metrics_public=True), engine=engine, dev_idp=idp)
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and "tlso_overrides" in response.text
