"""Alembic migrations, shipped inside the package (found by app.core.migrations with importlib.resources)."""
