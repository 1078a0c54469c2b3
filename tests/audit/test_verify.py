"""Reading the trail fast (app/audit/service.py `verify_chain`, `exported_rows`): the bytes hashed and the
rows exported are exactly the reference's, every change to a column is still found, and a verification
sees one snapshot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

import app.audit.service as service
from app.audit.chain import as_dict, chain_hash
from app.audit.export import to_jsonl
from app.audit.models import GENESIS_HASH, AuditEvent, AuditHead
from app.audit.service import exported_rows, iter_events, record, verify_chain
from app.core.db import reading, transaction

# Times whose text PostgreSQL writes in every length (no fraction, trailing zeros dropped, six digits) and
# text that JSON must escape.
AWKWARD = [
    {"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "actor": "Jürgen ✓", "comment": 'a "quoted" \\ back'},
    {"at": datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC), "via": "slack", "comment": "tab\tnew\nline\x01"},
    {"at": datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC), "override_id": None, "before": {"a": 'x "q"', "b": [1]}},
    {"at": datetime(2026, 1, 2, 3, 4, 6, 999999, tzinfo=UTC), "after": {"n": [1, 2.5, None], "t": "✓\u2028"}},
    {"at": datetime(2026, 1, 2, 3, 4, 7, 100, tzinfo=UTC), "action": "override.approved", "comment": ""},
]


def _add_trail(engine: Engine) -> int:
    """The awkward rows, chained the reference way and stored as the service stores them."""
    prev = GENESIS_HASH
    with Session(engine) as session:
        for seq, fields in enumerate(AWKWARD, 1):
            values: dict[str, Any] = {
                "actor": "alice",
                "via": None,
                "action": "override.created",
                "override_id": seq,
                "before": None,
                "after": {"state": "pending"},
                "comment": None,
            } | fields
            event = AuditEvent(seq=seq, prev_hash=prev, hash="", **values)
            event.hash = prev = chain_hash(prev, as_dict(event))
            session.add(event)
        session.flush()
        head = session.get(AuditHead, 1)
        assert head is not None
        head.seq, head.hash = len(AWKWARD), prev
        session.add(head)
        session.commit()
    return len(AWKWARD)


def _verify(engine: Engine) -> dict[str, Any]:
    with reading(engine) as session:
        return verify_chain(session, {}).model_dump()


def test_the_bytes_hashed_are_the_reference_form(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every awkward row verifies as read, without the reference hashing (which would hide a difference
    between the two forms behind a slower success)."""
    rows = _add_trail(engine)
    reference: list[int] = []
    monkeypatch.setattr(service, "chain_hash", lambda prev, row: reference.append(row["seq"]) or chain_hash(prev, row))
    assert _verify(engine) == {
        "valid": True,
        "checked": rows,
        "first_broken": None,
        "reason": None,
        "checkpoints": 0,
        "anchored_through": None,
    }
    assert reference == []


# row -> the change (PostgreSQL; SQLite keeps the time as text, changed below)
CHANGES = {
    "at": (1, "at = at + interval '1 microsecond'"),
    "at, trailing zeros dropped": (2, "at = at + interval '1 microsecond'"),
    "at, six digits": (4, "at = at - interval '1 microsecond'"),
    "actor": (3, "actor = 'Jurgen ✓'"),
    "via": (3, "via = 'api'"),
    "action": (3, "action = 'override.rejected'"),
    "override_id": (3, "override_id = 99"),
    "before": (3, """before = '{"a":"x \\"q\\"","b":[2]}'"""),
    "after": (3, """after = '{"state":"active"}'"""),
    "comment": (1, "comment = 'a \"quoted\" / back'"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_any_column_is_found(engine: Engine, backend: str, change: str) -> None:
    _add_trail(engine)
    seq, assignment = CHANGES[change]
    if backend == "sqlite" and change.startswith("at"):
        assignment = "at = '2026-01-02 03:04:05.000001'"
    with engine.begin() as conn:
        if backend == "postgres":
            conn.execute(sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete"))
        conn.execute(sa.text(f"UPDATE audit_event SET {assignment} WHERE seq = :seq"), {"seq": seq})
    result = _verify(engine)
    assert (result["valid"], result["first_broken"], result["reason"]) == (False, seq, "hash does not match content")


@pytest.mark.parametrize("backend", ["postgres"])
def test_rows_appended_while_verifying_do_not_break_the_trail(
    engine: Engine, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head and the rows come from one snapshot: a row appended after the head was read is not seen
    (before, a sound trail looked longer than its head)."""
    rows = _add_trail(engine)
    read_rows = service._hashed_rows

    def appended_first(session: Session, *args: Any) -> Iterator[dict[str, Any]]:
        with transaction(engine) as other:
            record(other, actor="bob", action="override.created", override_id=1)
        yield from read_rows(session, *args)

    monkeypatch.setattr(service, "_hashed_rows", appended_first)
    result = _verify(engine)
    assert (result["valid"], result["checked"]) == (True, rows)
    monkeypatch.undo()
    result = _verify(engine)
    assert (result["valid"], result["checked"]) == (True, rows + 1)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_broken_trail_found_mid_transaction_leaves_the_transaction_usable(engine: Engine, backend: str) -> None:
    """Verification stops at the first broken row while the server is still sending the rest (far more
    than a socket holds): the statement is read to its end, not cancelled, so the transaction lives on."""
    rows = _add_trail(engine) + 50_000
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_event (seq, at, actor, action, prev_hash, hash) SELECT n, now(), 'filler', "
                "'override.created', repeat('0', 64), repeat('0', 64) FROM generate_series(:first, :last) AS n"
            ),
            {"first": len(AWKWARD) + 1, "last": rows},
        )
        conn.execute(sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete"))
        conn.execute(sa.text("UPDATE audit_event SET comment = 'x' WHERE seq = 1"))
    with transaction(engine) as session:
        assert verify_chain(session, {}).first_broken == 1
        assert session.execute(sa.text("SELECT count(*) FROM audit_event")).scalar_one() == rows


def test_exported_rows_are_the_reference_rows(engine: Engine, client: Any, auth: Any) -> None:
    _add_trail(engine)
    with reading(engine) as session:
        reference = [as_dict(event) for event in iter_events(session)]
    with reading(engine) as session:
        assert list(exported_rows(session)) == reference
    response = client.get("/v1/audit/export", headers=auth("erin", "auditor"))
    assert response.status_code == 200
    assert response.text == "".join(to_jsonl(row) for row in reference)
    assert response.text == "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in reference)
