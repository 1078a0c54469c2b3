"""The Alembic migrations build exactly the schema the models describe, and can be rolled back."""

from __future__ import annotations

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
