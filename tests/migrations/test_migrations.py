"""The Alembic migrations build exactly the schema the models describe, and can be rolled back."""

from __future__ import annotations

import warnings
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

import app.models  # noqa: F401  (every table registers on SQLModel.metadata)
from app.core.migrations import alembic_config, current_and_head, upgrade

VALID_OTHER = {
    "destination": "example.net",
    "policy": "encrypt",
    "justification": "Recipient TLSA records are stale after a certificate renewal.",
}


def test_models_and_migrations_agree(engine: Engine) -> None:
    with engine.connect() as connection, warnings.catch_warnings():
        # SQLite's reflection cannot read an index on an expression (lower(ticket)); its presence is
        # checked in tests/overrides/test_queries.py on both databases.
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index")
        warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression-based index")
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


PERSON_KEYS = "7a4c2e9d1f08"  # alembic/versions/20261207_0200_person_keys.py
BEFORE_PERSON_KEYS = str(ScriptDirectory.from_config(alembic_config()).get_revision(PERSON_KEYS).down_revision)


def _migrate(engine: Engine, to: str, *, down: bool = False) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, to)


def test_person_keys_are_computed_for_existing_rows(engine: Engine, client: Any, make_override: Any, auth: Any) -> None:
    import sqlalchemy as sa

    override_id = make_override("alice")["id"]
    assert (
        client.post(
            f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=auth("bob", "approver")
        ).status_code
        == 200
    )
    retry = auth("alice", "requester") | {"Idempotency-Key": "k-1"}
    created = client.post("/v1/overrides", json={**VALID_OTHER}, headers=retry)
    assert created.status_code == 201, created.text
    _migrate(engine, BEFORE_PERSON_KEYS, down=True)
    with engine.begin() as conn:  # what older versions stored: names as given (or NFKC-casefolded)
        conn.execute(sa.text("UPDATE override SET requested_by = 'ALİCE', extension_requested_by = 'Zoë'"))
        conn.execute(sa.text("UPDATE vote SET reviewer = 'josé'"))
        conn.execute(sa.text("UPDATE idempotency_record SET principal = '|ALİCE'"))
    _migrate(engine, "head")
    with engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT requested_by_key, extension_requested_by_key FROM override")).all()
        assert {tuple(row) for row in keys} == {("alice", "zoe")}
        assert conn.execute(sa.text("SELECT reviewer, reviewer_key FROM vote")).one() == ("josé", "jose")
        assert conn.execute(sa.text("SELECT principal FROM idempotency_record")).scalar() == "|alice"
    mine = client.get("/v1/overrides", headers=auth("alice", "requester")).json()["items"]
    assert len(mine) == 2  # alice sees what 'ALİCE' asked for
    assert client.post("/v1/overrides", json={**VALID_OTHER}, headers=retry).headers.get("Idempotent-Replayed")


def test_upgrading_refuses_two_votes_by_one_person_and_changes_nothing(
    engine: Engine, client: Any, make_override: Any, auth: Any
) -> None:
    import pytest
    import sqlalchemy as sa

    override_id = make_override("alice", policy="none")["id"]  # two approvals needed
    for reviewer in ("bob", "carol"):
        assert (
            client.post(
                f"/v1/overrides/{override_id}/approve", json={"comment": "ok"}, headers=auth(reviewer, "approver")
            ).status_code
            == 200
        )
    _migrate(engine, BEFORE_PERSON_KEYS, down=True)
    with engine.begin() as conn:  # the hole this closes: one person, two spellings, two votes
        conn.execute(sa.text("UPDATE vote SET reviewer = 'Zoë' WHERE reviewer = 'bob'"))
        conn.execute(sa.text("UPDATE vote SET reviewer = 'ZOE\u0308' WHERE reviewer = 'carol'"))
    with pytest.raises(RuntimeError, match=f"override {override_id} round 0: 2 votes by 'zoe'"):
        _migrate(engine, "head")
    assert current_and_head(engine)[0] == BEFORE_PERSON_KEYS
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("vote")}
    assert "reviewer_key" not in columns
