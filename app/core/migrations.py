"""Run Alembic from code: `python -m app migrate`, test fixtures and the readiness check.

The migrations ship inside the package (`app/migrations`), so an installed wheel migrates from any
working directory; `alembic.ini` at the repository root points at the same folder for developers
who run `alembic revision`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine


def script_location() -> Path:
    """The folder holding env.py, script.py.mako and versions/ (Alembic needs a real directory)."""
    location = resources.files("app.migrations")
    if not isinstance(location, Path) or not (location / "env.py").is_file():
        raise RuntimeError(f"the migrations are not installed as files: {location}")
    return location


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_and_head(engine: Engine) -> tuple[str | None, str | None]:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head
