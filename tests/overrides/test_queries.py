"""What the override reads cost the database: a page's votes in one query (no query per item), a single
override in one query, and every list filter served by an index in the page's order (so a page stays
as fast at a million rows as at a thousand)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.helpers import act

Statements = list[tuple[str, Any]]


@contextmanager
def statements(engine: Engine) -> Iterator[Statements]:
    """The SQL statements `engine` runs meanwhile (with their parameters), also those the API's reads on the
    event loop send on PostgreSQL (app/core/db.py `AsyncReads`, psycopg's async cursors directly)."""
    seen: Statements = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's explicit BEGIN (PostgreSQL's is implicit)
            seen.append((statement, parameters))

    execute = psycopg.AsyncCursor.execute

    async def async_execute(self: psycopg.AsyncCursor[Any], query: Any, params: Any = None, **kw: Any) -> Any:
        seen.append((str(query), params))
        return await execute(self, query, params, **kw)

    event.listen(engine, "before_cursor_execute", before)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.AsyncCursor, "execute", async_execute)
        try:
            yield seen
        finally:
            event.remove(engine, "before_cursor_execute", before)


@pytest.fixture
def reviewer(auth: Callable[..., dict[str, str]]) -> dict[str, str]:
    return auth("bob", "approver")


def _reviewed(make_override: Any, client: Any, reviewer: dict[str, str], count: int, at: int = 0) -> list[int]:
    ids = []
    for i in range(at, at + count):
        created = make_override(destination=f"q{i}.example", ticket=f"OPS-{i}")
        act(client, created["id"], "approve", reviewer)
        ids.append(created["id"])
    return ids


def test_a_page_loads_its_votes_in_one_query(
    client: Any, engine: Engine, make_override: Any, reviewer: dict[str, str]
) -> None:
    _reviewed(make_override, client, reviewer, 1)
    with statements(engine) as one_item:
        assert len(client.get("/v1/overrides", headers=reviewer).json()["items"]) == 1
    _reviewed(make_override, client, reviewer, 4, at=1)
    with statements(engine) as five_items:
        page = client.get("/v1/overrides", headers=reviewer).json()["items"]
    with statements(engine) as five_in_full:
        full = client.get("/v1/overrides", params={"view": "full"}, headers=reviewer).json()["items"]
    with statements(engine) as five_again:
        assert client.get("/v1/overrides", headers=reviewer).json()["items"] == page
    assert len(page) == 5 and all(len(item["votes"]) == 1 for item in full)
    assert len(five_in_full) == 1  # the page with its votes joined
    # Compact, on PostgreSQL: the page's stamps, then the items not encoded before with their votes in one
    # statement (app/overrides/briefs.py); all of them kept: the stamps only. SQLite: the one statement.
    assert len(five_items) == len(one_item) == (2 if engine.dialect.name == "postgresql" else 1)
    assert len(five_again) == 1
    assert [item["approvals"][0]["reviewer"] for item in page] == ["bob"] * 5


def test_one_override_is_read_in_one_query(
    client: Any, engine: Engine, make_override: Any, reviewer: dict[str, str]
) -> None:
    [override_id] = _reviewed(make_override, client, reviewer, 1)
    with statements(engine) as seen:
        answer = client.get(f"/v1/overrides/{override_id}", headers=reviewer)
    assert answer.status_code == 200 and [v["reviewer"] for v in answer.json()["votes"]] == ["bob"]
    assert len(seen) == 1, seen
    unvoted = make_override(destination="fresh.example")
    answer = client.get(f"/v1/overrides/{unvoted['id']}", headers=reviewer)
    assert answer.status_code == 200 and answer.json()["votes"] == []  # no votes: still the override
    assert client.get("/v1/overrides/99999", headers=reviewer).status_code == 404


def test_the_ticket_filter_ignores_case(client: Any, make_override: Any, reviewer: dict[str, str]) -> None:
    upper = make_override(destination="a.example", ticket="MAIL-4711")
    lower = make_override(destination="b.example", ticket="mail-4711")
    make_override(destination="c.example", ticket="MAIL-4712")
    for asked in ("MAIL-4711", "mail-4711", "Mail-4711"):
        found = client.get("/v1/overrides", params={"ticket": asked}, headers=reviewer).json()["items"]
        assert [item["id"] for item in found] == [lower["id"], upper["id"]]


FILTERS = {
    "state": ({"state": "pending"}, "ix_override_state_id"),
    "ticket": ({"ticket": "ops-1"}, "ix_override_ticket_lower_id"),
    "destination": ({"destination": "q1.example"}, "ix_override_destination_id"),
    "requester": ({"requester": "alice"}, "ix_override_requested_by_key_id"),
    "target": ({"target": "default"}, "ix_override_target_id"),
}


def _plan(engine: Engine, statement: str, parameters: Any) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return "\n".join(str(row[-1]) for row in rows)
        conn.exec_driver_sql("SET enable_seqscan = off")  # a test table is tiny: ask whether an index CAN serve
        return "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters).all())


def _page_plan(engine: Engine, statement: str, parameters: Any) -> str:
    """The plan of a list page's own part: the `page` CTE (the overrides, limited), not the votes joined to it
    and their order (a sort of the page's few rows)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            [page] = [row[0] for row in rows if row[-1] in ("CO-ROUTINE page", "MATERIALIZE page")]
            inside, found = {page}, []
            for node, parent, _, detail in rows:  # parents come before their children
                if parent in inside:
                    inside.add(node)
                    found.append(detail)
            return "\n".join(found)
        conn.exec_driver_sql("SET enable_seqscan = off")
        lines = [row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()]
    start = next(i for i, line in enumerate(lines) if line.lstrip(" ->").startswith("Limit"))
    depth = len(lines[start]) - len(lines[start].lstrip(" ->"))
    below = [line for line in lines[start + 1 :] if not line.startswith(" " * depth)]
    end = lines.index(below[0]) if below else len(lines)
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_every_list_filter_has_an_index_in_the_page_order(
    client: Any, engine: Engine, make_override: Any, reviewer: dict[str, str], name: str
) -> None:
    _reviewed(make_override, client, reviewer, 2)
    params, index = FILTERS[name]
    with statements(engine) as seen:
        assert client.get("/v1/overrides", params=params, headers=reviewer).status_code == 200
    # The page's own statement (on PostgreSQL the stamps of app/overrides/briefs.py; the items not kept are
    # read by their ids after it).
    [(statement, parameters)] = [(s, p) for s, p in seen if "FROM override" in s and "LIMIT" in s]
    plan = _page_plan(engine, statement, parameters)
    assert index in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # the index gives the order: no sort


@pytest.mark.parametrize(
    ("params", "index"),
    [
        ({"action": "override.created"}, "ix_audit_event_action_seq"),
        ({"actor": "alice"}, "ix_audit_event_actor_seq"),
        ({"override_id": 1}, "ix_audit_event_override_id_seq"),
    ],
)
def test_the_audit_page_filters_have_indexes_in_its_order(
    client: Any, engine: Engine, make_override: Any, auth: Any, params: dict[str, Any], index: str
) -> None:
    make_override()
    with statements(engine) as seen:
        assert client.get("/v1/audit", params=params, headers=auth("audrey", "auditor")).status_code == 200
    statement, parameters = next((s, p) for s, p in seen if "FROM audit_event" in s)
    plan = _plan(engine, statement, parameters)
    assert index in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
