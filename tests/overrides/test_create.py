"""`POST /v1/overrides` on PostgreSQL without an Idempotency-Key runs on the event loop, the override and its
audit entries in one statement (app/overrides/service.py `create_override_at_once`); with a key, and on
SQLite, it takes the ORM's path. Both give the same answer byte for byte, the same rows and the same
problems, also on a connection that prepared the statement long ago and on a new one; audit pieces that
would not hash as they verify are never sent, and a statement whose time text would not verify refuses
itself and writes nothing (it commits with no look from Python); and a request that waits on a racing
request's uniqueness check does not hold the audit chain meanwhile."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.audit import service as audit_service
from app.core.db import AsyncReads, close_async_reads
from app.overrides import evidence as evidence_module
from app.overrides import router, service
from app.targets import queue as queue_module
from tests.helpers import VALID_REQUEST, LiveServer, counts, make_settings

NOW = datetime(2026, 12, 7, 9, 30, 1, 250000, tzinfo=UTC)


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths take the same `now`, so their answers can be compared whole."""
    monkeypatch.setattr(service, "utcnow", lambda: NOW)


@pytest.fixture
def orm_path() -> Iterator[Callable[[bool], None]]:
    """`orm_path(True)`: creates take the ORM's path on PostgreSQL too (as they do with a key)."""
    patch = pytest.MonkeyPatch()

    def use(orm: bool) -> None:
        if orm:
            patch.setattr(router, "async_statements", lambda request: None)
        else:
            patch.undo()

    yield use
    patch.undo()


def _post(client: TestClient, headers: dict[str, str], **fields: Any) -> httpx.Response:
    response: httpx.Response = client.post("/v1/overrides", json={**VALID_REQUEST, **fields}, headers=headers)
    return response


def _audit(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM audit_event ORDER BY seq")).mappings().all()
    return [dict(row) for row in rows]


def _without(answer: str, override_id: int, destination: str) -> str:
    """`answer` with the override's id and destination (all two paths' answers differ in) left out."""
    for with_id in ('"id":{}', "/{}/", '/{}"', "Override {} "):
        answer = answer.replace(with_id.format(override_id), with_id.format(0))
    return answer.replace(destination, "DEST")


# A request that waits for review, and one approved at once (its second audit entry).
PENDING_AND_AUTO_APPROVED = pytest.mark.parametrize(
    "settings",
    [make_settings(), make_settings(auto_approve_policies=["encrypt"])],
    ids=["pending", "auto-approved"],
)


@PENDING_AND_AUTO_APPROVED
def test_the_answer_is_the_override_as_it_reads(
    client: TestClient, auth: Callable[..., dict[str, str]], frozen: None
) -> None:
    """The 201's body is `GET /v1/overrides/{id}`'s, byte for byte, and its ETag and Location are too."""
    # Values bound by psycopg on a prepared statement (app/core/db.py `AsyncReads.write`) arrive as sent.
    justification = "It's 100 % broken: \\x00 ':id' %(x)s $1 ; -- \"Bücher\" ␀ " + "and stale."
    created = _post(
        client, auth("alice", "requester"), ticket_url="https://tickets.example/OPS-1", justification=justification
    )
    assert created.status_code == 201, created.text
    assert created.json()["justification"] == justification
    override_id = created.json()["id"]
    read = client.get(f"/v1/overrides/{override_id}", headers=auth("alice", "requester"))
    assert created.content == read.content
    assert created.headers["etag"] == read.headers["etag"] == '"1"'
    assert created.headers["location"] == f"/v1/overrides/{override_id}"
    verified = client.get("/v1/audit/verify", headers=auth("erin", "auditor")).json()
    assert verified["valid"] is True, verified


@PENDING_AND_AUTO_APPROVED
def test_both_paths_answer_and_record_alike(
    backend: str,
    client: TestClient,
    engine: Engine,
    auth: Callable[..., dict[str, str]],
    frozen: None,
    orm_path: Callable[[bool], None],
) -> None:
    if backend != "postgres":
        pytest.skip("SQLite has the ORM's path only")
    answers, problems, trails = [], [], []
    for orm, destination in ((False, "fast.example"), (True, "orm.example")):
        orm_path(orm)
        headers = auth("ticketing-sa", "integration", client_id="ticketing", on_behalf_of="carol")
        created = _post(client, headers, destination=destination)
        assert created.status_code == 201, created.text
        override_id = created.json()["id"]
        answers.append((_without(created.text, override_id, destination), created.headers["etag"]))
        again = _post(client, auth("bea", "requester"), destination=destination, policy="may")
        assert again.status_code == 409
        problems.append((again.headers["content-type"], _without(again.text, override_id, destination)))
        hidden = {"seq", "at", "hash", "prev_hash", "override_id"}
        trails.append(
            [
                json.loads(
                    _without(json.dumps({k: v for k, v in row.items() if k not in hidden}), override_id, destination)
                )
                for row in _audit(engine)
                if row["override_id"] == override_id
            ]
        )
    orm_path(False)
    assert answers[0] == answers[1]
    assert '"requested_via":"ticketing"' in answers[0][0]
    assert problems[0] == problems[1]
    assert trails[0] == trails[1] and trails[0]
    verified = client.get("/v1/audit/verify", headers=auth("erin", "auditor")).json()
    assert verified["valid"] is True, verified


def _refused_then_created(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, client: TestClient, auth: Callable[..., Any]
) -> None:
    """A create under `monkeypatch`'s change is a 500 that writes nothing; without it, the chain goes on."""
    before = counts(engine)
    assert _post(client, auth("alice", "requester")).status_code == 500
    assert counts(engine) == before
    monkeypatch.undo()
    monkeypatch.setattr(service, "_CREATED", {})  # the statement made anew, as it is
    assert _post(client, auth("alice", "requester")).status_code == 201  # the head did not move
    verified = client.get("/v1/audit/verify", headers=auth("erin", "auditor")).json()
    assert verified["valid"] is True and verified["checked"] == before["audit_event"] + 1, verified


def test_audit_pieces_that_would_not_hash_as_they_verify_are_never_sent(
    backend: str, engine: Engine, monkeypatch: pytest.MonkeyPatch, client: TestClient, auth: Callable[..., Any]
) -> None:
    if backend != "postgres":
        pytest.skip("the one-statement create is PostgreSQL's")
    # The pieces put together with JSON's default separators: not the canonical text's.
    monkeypatch.setattr(audit_service, "_json_text", lambda value: json.dumps(value, sort_keys=True))
    _refused_then_created(engine, monkeypatch, client, auth)


def test_a_statement_whose_audit_time_would_not_verify_writes_nothing(
    backend: str, engine: Engine, monkeypatch: pytest.MonkeyPatch, client: TestClient, auth: Callable[..., Any]
) -> None:
    """The statement commits with no look from Python: it refuses itself a time text that is not `at`'s."""
    if backend != "postgres":
        pytest.skip("the one-statement create is PostgreSQL's")
    shifted = audit_service._ROW_CTE.replace("SELECT ts, to_char(ts,", "SELECT ts, to_char(ts + interval '1 second',")
    assert shifted != audit_service._ROW_CTE
    monkeypatch.setattr(audit_service, "_ROW_CTE", shifted)
    monkeypatch.setattr(service, "_CREATED", {})
    _refused_then_created(engine, monkeypatch, client, auth)


def test_a_create_waiting_on_a_racing_insert_does_not_hold_the_chain(
    backend: str, engine: Engine, live_server: LiveServer, auth: Callable[..., dict[str, str]]
) -> None:
    """The override is inserted before the audit head is locked: while a create waits for another
    transaction's row at its destination, anyone may still append to the chain (no deadlock, no wait)."""
    if backend != "postgres":
        pytest.skip("the one-statement create is PostgreSQL's")
    answers: list[httpx.Response] = []
    with engine.connect() as racer:
        racer.execute(
            sa.text(
                "INSERT INTO override (target, destination, policy, parameters, justification, duration_seconds, "
                "state, live, version, requested_by, requested_by_key, requested_by_name, approvals_required, "
                "created_at, updated_at, extension_round, attempts, clean_checks) VALUES ('default', 'example.org', "
                "'encrypt', '', 'racing', 60, 'pending', true, 1, 'bea', 'bea', 'Bea', 1, now(), now(), 0, 0, 0)"
            )
        )
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{live_server.url}/v1/overrides",
                    json=VALID_REQUEST,
                    headers=auth("alice", "requester"),
                    timeout=60,
                )
            )
        )
        sender.start()
        with engine.connect() as watch:
            for _ in range(600):  # until the create waits on the racer's row (at most a minute)
                waiting = watch.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                        "current_database()"
                    )
                ).scalar_one()
                watch.rollback()  # the statistics are a snapshot per transaction: a new one each time
                if waiting:
                    break
                time.sleep(0.1)
            assert waiting == 1
            with watch.begin():
                watch.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
                assert watch.execute(sa.text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")).scalar_one() >= 0
        racer.commit()
        sender.join(60)
    [answer] = answers
    assert answer.status_code == 409, answer.text
    assert answer.json()["existing"].startswith("/v1/overrides/")


async def test_a_write_that_fails_gives_its_connection_back_clean(engine: Engine, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("AsyncReads is PostgreSQL's")
    statement = sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, 'x') RETURNING id").columns(
        sa.column("id", sa.Integer)
    )
    reads = AsyncReads(engine, size=1)
    try:
        with pytest.raises(sa.exc.IntegrityError):  # the head exists: nothing is written
            await reads.write(statement, {})
        ok = sa.select(sa.literal(1, sa.Integer).label("one"))
        assert [row.one for row in await reads.rows(ok, {})] == [1]  # its one connection is back, usable
    finally:
        await reads.close()


def _stored(engine: Engine, override_id: int, destination: str) -> tuple[str, list[str]]:
    """The override's row and its audit rows as PostgreSQL writes them out (each column's text), without
    what two creates differ in (id, destination, the audit rows' place in the chain and time)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT (o.*)::text FROM override AS o WHERE id = :id"), {"id": override_id}
        ).scalar_one()
        trail = conn.execute(
            sa.text(
                "SELECT ROW(actor, via, action, before::text, after::text, comment)::text FROM audit_event "
                "WHERE override_id = :id ORDER BY seq"
            ),
            {"id": override_id},
        ).scalars()
        row = row.replace(f"({override_id},", "(0,", 1)  # the id is the first column
        return _without(row, override_id, destination), [_without(text, override_id, destination) for text in trail]


def _prepared_creates(app: Any, client: TestClient) -> list[tuple[datetime, int]]:
    """The create statements prepared on the app's one pooled connection: when, and how often executed."""

    async def read() -> list[tuple[datetime, int]]:
        [pooled] = app.state.tlso_async_reads._idle
        cursor = await pooled.conn.execute(
            "SELECT prepare_time, generic_plans + custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE 'WITH subject AS (INSERT INTO override %'"
        )
        return await cursor.fetchall()

    prepared: list[tuple[datetime, int]] = client.portal.call(read)  # type: ignore[union-attr]
    return prepared


@PENDING_AND_AUTO_APPROVED
def test_each_connection_prepares_the_statement_once_and_stores_the_orms_rows(
    backend: str,
    app: Any,
    client: TestClient,
    engine: Engine,
    auth: Callable[..., dict[str, str]],
    frozen: None,
    orm_path: Callable[[bool], None],
) -> None:
    """The statement is prepared on a connection once, and each create after that on it (after a 409 too,
    whose transaction was rolled back) stores the ORM's rows, byte for byte; so does a new connection,
    which prepares it again."""
    if backend != "postgres":
        pytest.skip("the one-statement create is PostgreSQL's")
    headers = auth("ticketing-sa", "integration", client_id="ticketing", on_behalf_of="carol")

    def created(destination: str) -> tuple[str, list[str]]:
        answer = _post(client, headers, destination=destination)
        assert answer.status_code == 201, answer.text
        return _stored(engine, answer.json()["id"], destination)

    orm_path(True)
    reference = created("orm.example")
    orm_path(False)
    assert reference[1] and all(created(f"fast{i}.example") == reference for i in range(4))
    [(prepared_at, executed)] = _prepared_creates(app, client)  # one connection (one request at a time)
    assert executed == 4  # prepared once, executed four times
    before = counts(engine)
    assert _post(client, headers, destination="fast0.example").status_code == 409
    assert counts(engine) == before
    assert created("after-conflict.example") == reference
    assert _prepared_creates(app, client) == [(prepared_at, 6)]
    client.portal.call(close_async_reads, app.state)  # type: ignore[union-attr]
    assert created("new-connection.example") == reference
    [(again_at, executed)] = _prepared_creates(app, client)
    assert again_at > prepared_at and executed == 1  # the new connection prepared it again


async def test_a_connection_whose_prepared_statement_is_gone_fails_one_write_and_writes_nothing(
    engine: Engine, backend: str
) -> None:
    """psycopg prepares a statement again after a `DEALLOCATE ALL` it sees; one done behind its back (a
    pooler, say) fails that write, with nothing written, and the connection is not used again."""
    if backend != "postgres":
        pytest.skip("AsyncReads is PostgreSQL's")
    statement = sa.text("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq").columns(
        sa.column("seq", sa.Integer)
    )
    reads = AsyncReads(engine, size=1)
    try:
        [(first,)] = await reads.write(statement, {})
        [pooled] = reads._idle
        await pooled.conn.execute("DEALLOCATE ALL")  # seen by psycopg: prepared again
        assert await reads.write(statement, {}) == [(first + 1,)]
        pooled.conn.pgconn.exec_(b"DEALLOCATE ALL")  # not seen
        with pytest.raises(sa.exc.ProgrammingError):
            await reads.write(statement, {})
        assert pooled.conn.closed and not reads._idle
        assert await reads.write(statement, {}) == [(first + 2,)]  # on a new connection; nothing was written
    finally:
        await reads.close()


def _on_the_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    ("settings", "io"),
    [
        (make_settings(), False),
        (make_settings(diagnosis_on_create=True), True),
        (make_settings(mailcow_url="http://127.0.0.1:9", mailcow_api_key="k", queue_evidence_budget_seconds=1), True),
    ],
    ids=["nothing-to-wait-for", "diagnosis", "mail-queue"],
)
def test_evidence_that_waits_on_io_is_gathered_in_a_thread_and_only_then(
    backend: str, client: TestClient, auth: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch, io: bool
) -> None:
    """Without a diagnosis and a mail queue to read, the evidence is put together on the event loop (a hop to
    a thread and back cost more than the rest of it); anything that waits on I/O runs in a thread."""
    if backend != "postgres":
        pytest.skip("the one-statement create is PostgreSQL's")
    hops: list[Any] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(function: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(function, "__qualname__", "").startswith("create_override_at_once."):
            hops.append(function)
        return await run_sync(function, *args, **kwargs)

    looked: list[bool] = []  # for each look at the database or a key file: was it on the event loop?

    def watched(original: Callable[..., Any]) -> Callable[..., Any]:
        def look(*args: Any) -> Any:
            looked.append(_on_the_event_loop())
            return original(*args)

        return look

    async def no_network(*args: Any) -> Any:
        raise RuntimeError("no DNS in this test")

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    for module, name in ((evidence_module, "reading"), (queue_module, "reading"), (queue_module, "configured_targets")):
        monkeypatch.setattr(module, name, watched(getattr(module, name)))
    monkeypatch.setattr(evidence_module, "diagnose_within_budget", no_network)
    created = _post(client, auth("alice", "requester"))
    assert created.status_code == 201, created.text
    assert len(hops) == io
    assert looked if io else not looked
    assert not any(looked), "I/O on the event loop"
    answer = created.json()
    if io:  # what the I/O found (nothing answers here): recorded with the request, which was not held up
        assert "failed" in str(answer["diagnosis"]) or "could not be read" in str(answer["queue"]), answer
