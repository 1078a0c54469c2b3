"""The Alembic migrations build exactly the schema the models describe, and can be rolled back."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

import app.models  # noqa: F401  (every table registers on SQLModel.metadata)
from app.core.migrations import alembic_config, current_and_head, upgrade


def test_models_and_migrations_agree(engine: Engine) -> None:
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == []


def test_database_is_at_head_and_round_trips(engine: Engine) -> None:
    current, head = current_and_head(engine)
    assert current == head is not None
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert current_and_head(engine)[0] is None
    upgrade(engine)
    assert current_and_head(engine) == (head, head)


def test_the_latest_step_goes_down_and_up_again_with_data(
    engine: Engine, client: Any, make_override: Any, auth: Any
) -> None:
    """A downgrade must work on a database in use (votes refer to overrides: no table rebuild on SQLite)."""
    import sqlalchemy as sa

    override_id = make_override()["id"]
    vote = client.post(f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=auth("bob", "approver"))
    assert vote.status_code == 200, vote.text
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM override")).scalar()
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    current, head = current_and_head(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM override")).scalar() == before == 1
    assert current == head
