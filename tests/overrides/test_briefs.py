"""A compact page on PostgreSQL is assembled from briefs encoded before (app/overrides/briefs.py), kept by the
version of the row they were made from: each page is still the page the models give for the rows as they
are, whatever changed in between — the override's row by any path (one that leaves `version` alone too), a
vote added without touching the override, the clock passing a removal deadline — and a row that changes
between the page's two statements sends the page back to the one-statement read."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from app.core.db import AsyncReads, transaction
from app.overrides import briefs, lifecycle, service
from app.overrides.briefs import BriefCache, kept_briefs
from app.overrides.models import Override, OverrideState
from app.overrides.reads import vote_reads
from tests.helpers import act, apply_now
from tests.overrides.test_reads import model_page

pytestmark = pytest.mark.parametrize("backend", ["postgres"])


def _models_page(engine: Engine, state: str | None = None) -> bytes:
    """The page the models give for the overrides as they are now (newest first, one page)."""
    with transaction(engine) as session:
        query = select(Override.id).order_by(col(Override.id).desc())
        if state:
            query = query.where(col(Override.state) == state)
        ids = [i or 0 for i in session.exec(query).all()]
        page = [(lifecycle.load(session, i), vote_reads(service.votes_of(session, i))) for i in ids]
    return model_page(page, None)  # type: ignore[arg-type]


def _cache(app: Any) -> BriefCache:
    cache: BriefCache = app.state.tlso_brief_cache[1]
    return cache


def test_a_kept_brief_is_encoded_again_when_its_row_its_votes_or_the_clock_changes(
    app: Any, client: Any, engine: Engine, make_override: Any, auth: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviewer = auth("bob", "approver")
    first, second, third = (make_override(destination=f"d{i}.example")["id"] for i in range(3))

    def page() -> bytes:
        answer = client.get("/v1/overrides", headers=reviewer)
        assert answer.status_code == 200
        return bytes(answer.content)

    assert page() == _models_page(engine)
    assert len(_cache(app)) == 3
    assert page() == _models_page(engine)  # every item kept: the same bytes
    assert len(_cache(app)) == 3

    # A change that leaves `version` alone (as the worker's bookkeeping does).
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE override SET justification = 'changed by hand, version kept' WHERE id = :i"), {"i": first}
        )
    assert b"changed by hand, version kept" in page()
    assert page() == _models_page(engine)

    # A vote, with the override's row untouched.
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO vote (override_id, round, reviewer, reviewer_key, reviewer_name, decision, comment, "
                "created_at) VALUES (:i, 0, 'carol', 'carol', 'Carol', 'approve', 'ok', now())"
            ),
            {"i": second},
        )
    assert b'"reviewer":"carol"' in page()
    assert page() == _models_page(engine)

    # The clock passes a removal deadline: the same row version, `overdue` turns true.
    assert act(client, third, "approve", reviewer).status_code == 200
    apply_now(engine, third)
    assert act(client, third, "revoke", auth("root", "admin")).status_code == 200
    with transaction(engine) as session:
        deadline = lifecycle.load(session, third).removal_deadline
    assert deadline is not None
    overdue = [item["overdue"] for item in client.get("/v1/overrides", headers=reviewer).json()["items"]]
    assert overdue == [False, False, False]
    monkeypatch.setattr(briefs, "utcnow", lambda: deadline + timedelta(seconds=1))
    overdue = [item["overdue"] for item in client.get("/v1/overrides", headers=reviewer).json()["items"]]
    assert overdue == [True, False, False]


@pytest.mark.parametrize(
    "change",
    ["UPDATE override SET state = 'approved' WHERE id = :i", "DELETE FROM override WHERE id = :i"],
    ids=["approved", "deleted"],
)
def test_a_row_that_changes_between_the_two_statements_sends_the_page_to_the_one_statement_read(
    app: Any, client: Any, engine: Engine, make_override: Any, auth: Any, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The stamps say pending; before the items are read in full, one is approved (or gone): the page is
    read again in one statement (it is no longer on a page of pending ones), and nothing is kept."""
    reviewer = auth("bob", "approver")
    kept, moved = (make_override(destination=f"m{i}.example")["id"] for i in range(2))
    rows = AsyncReads.rows
    calls: list[str] = []

    async def approve_in_between(self: AsyncReads, statement: Any, parameters: dict[str, Any]) -> list[Any]:
        found = await rows(self, statement, parameters)
        calls.append("ids" if "ids" in parameters else "page")
        if len(calls) == 1:
            with engine.begin() as conn:
                conn.execute(sa.text(change), {"i": moved})
        return found

    monkeypatch.setattr(AsyncReads, "rows", approve_in_between)
    answer = client.get("/v1/overrides", params={"state": "pending"}, headers=reviewer)
    assert answer.status_code == 200
    assert [item["id"] for item in answer.json()["items"]] == [kept]
    assert answer.content == _models_page(engine, "pending")
    assert calls == ["page", "ids", "page"]  # stamps, the items in full, then the one-statement read
    assert len(_cache(app)) == 0


def test_the_cache_keeps_at_most_its_size_and_zero_turns_it_off(
    app: Any, client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    cache = BriefCache(2)
    for i in range(3):
        cache.put((i, "1", 0, None, False), b"{}")
    assert len(cache) == 2 and cache.get((0, "1", 0, None, False)) is None

    make_override(destination="off.example")
    app.state.settings = app.state.settings.model_copy(update={"brief_cache_size": 0})
    answer = client.get("/v1/overrides", headers=auth("bob", "approver"))
    assert answer.content == _models_page(engine)
    assert kept_briefs(app.state) is None and getattr(app.state, "tlso_brief_cache", None) is None  # none made


def test_every_state_reads_alike_through_the_kept_briefs(
    client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    """Each state's page twice (encoded, then kept): the models' page both times."""
    reviewer = auth("bob", "approver")
    approved = make_override(destination="approved.example")["id"]
    assert act(client, approved, "approve", reviewer).status_code == 200
    rejected = make_override(destination="rejected.example")["id"]
    assert act(client, rejected, "reject", reviewer).status_code == 200
    make_override(destination="pending.example")
    for state in (OverrideState.pending, OverrideState.approved, OverrideState.rejected):
        for _ in range(2):
            answer = client.get("/v1/overrides", params={"state": state.value}, headers=reviewer)
            assert answer.content == _models_page(engine, state.value)
