"""The hash-chained audit trail: record in the caller's transaction, verify, export.

`record()` queues an entry on the session; the entries are chained and inserted when that session
commits (a `before_commit` hook), after every other write of the transaction. Appending locks the
single `audit_head` row, so concurrent transactions chain one after the other and never fork.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import pq
from psycopg.types.string import TextLoader
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import event
from sqlmodel import Session, col, select

from app.audit.chain import Entry, as_dict, canonical, chain_hash, new_entry
from app.audit.export import ExportFormatError
from app.audit.models import GENESIS_HASH, AuditEvent, AuditHead
from app.audit.signing import CHECKPOINT_ACTION, Checkpoint, PublicKey
from app.core.db import compact_json, utcnow

_PENDING = "audit_pending"


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    via: str | None = None,
    override_id: int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    comment: str | None = None,
) -> None:
    """Queue an audit entry; it is written in the same transaction, when the session commits."""
    entry = new_entry(
        actor=actor, via=via, action=action, override_id=override_id, before=before, after=after, comment=comment
    )
    session.info.setdefault(_PENDING, []).append(entry)


_EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]
_HEAD = AuditHead.__table__  # type: ignore[attr-defined]
_LOCK_HEAD = sa.select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_MOVE_HEAD = (
    sa.update(_HEAD).where(_HEAD.c.id == 1).values(seq=sa.bindparam("head_seq"), hash=sa.bindparam("head_hash"))
)


@event.listens_for(Session, "before_commit")
def _write_pending(session: Session) -> None:
    pending: list[Entry] = session.info.pop(_PENDING, [])
    if not pending:
        return
    # The transaction's other writes first: the chain's lock is the last thing taken before COMMIT, so
    # concurrent writers wait on each other for as short a time as possible.
    session.flush()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # A job that records many rows at once appends them a few per statement: the statements (one per
        # row count) stay few and small.
        for first in range(0, len(pending), _ROWS_PER_STATEMENT):
            _append_in_one_statement(connection, pending[first : first + _ROWS_PER_STATEMENT])
        return
    seq, prev_hash = connection.execute(_LOCK_HEAD).one()
    rows: list[dict[str, Any]] = []
    for entry in pending:
        seq += 1
        row = _row(entry, seq, utcnow(), prev_hash)
        prev_hash = row["hash"] = chain_hash(prev_hash, row | {"at": row["at"].isoformat()})
        rows.append(row)
    connection.execute(sa.insert(_EVENTS), rows)
    connection.execute(_MOVE_HEAD, {"head_seq": seq, "head_hash": prev_hash})


def _row(entry: Entry, seq: int, at: datetime, prev_hash: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at,
        "actor": entry.actor,
        "via": entry.via,
        "action": entry.action,
        "override_id": entry.override_id,
        "before": entry.before,
        "after": entry.after,
        "comment": entry.comment,
        "prev_hash": prev_hash,
    }


# PostgreSQL: the head is locked, the rows are chained and inserted and the head is moved in ONE statement,
# so the lock is held for that statement and the COMMIT only (no round trip to Python under it). The hash is
# computed by the server from the canonical text Python puts together around the three values only the
# locked head decides: `prev_hash` (twice: the chain and the field), `seq`, and `at` (the server's clock
# once the lock is held, as Python's was before: the times stay in sequence order).
# sha256(prev_hash "\n" {"action":…,"actor":…,"after":…,"at":"<at>","before":…,"comment":…,
#        "override_id":…,"prev_hash":"<prev_hash>","seq":<seq>,"via":…})
# Nothing that would not verify is stored, and the statement needs no look from Python before its COMMIT
# (app/core/db.py `AsyncReads.write` sends both at once):
# - the pieces are checked before the statement is sent: joined around sample values they must be the
#   canonical text of that sample row (`_check_pieces`); they do not depend on the values put between them;
# - the values the server puts between them are an integer's text (`seq`, the override's id), the head's
#   hash as stored, and `at`'s text, which the statement checks itself (`_AT_CHECKED`): it must have the shape
#   `datetime.isoformat()` gives an aware UTC time, six digits of fraction exactly when there are
#   microseconds, and read back as `at` itself; else the statement fails (a cast that cannot succeed, whose
#   message says why) and nothing is written.
# Rows appended in the ORM's transaction (`_append_in_one_statement`) are also re-hashed the reference way
# (`chain_hash`) before its COMMIT.
_AT_TEXT = (
    "to_char(ts, 'YYYY-MM-DD\"T\"HH24:MI:SS')"
    " || CASE WHEN mod(extract(microseconds FROM ts)::bigint, 1000000) = 0 THEN '' ELSE to_char(ts, '.US') END"
    " || '+00:00'"  # as datetime.isoformat() writes an aware UTC time
)
_AT_CHECKED = (
    "t.at_text ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]{6})?[+]00:00$'"
    " AND t.at_text !~ '[.]000000[+]' AND CAST(t.at_text AS TIMESTAMPTZ) AT TIME ZONE 'UTC' = t.ts"
)
# Built from these constants and row numbers only (no value is ever formatted into the SQL: all are bound).
_ROW_CTE = (
    "r{i} AS (SELECT p.seq + 1 AS seq, p.hash AS prev_hash, t.ts AS at, {override_id} AS override_id,"  # noqa: S608
    " CASE WHEN {checked} THEN encode(sha256(convert_to(p.hash, 'UTF8') || :a{i} || convert_to(t.at_text, 'UTF8')"
    " || {b} || convert_to(p.hash, 'UTF8') || :c || convert_to((p.seq + 1)::text, 'UTF8') || :d{i}), 'hex')"
    " ELSE CAST('the audit time ' || t.at_text || ' is not as Python writes it: nothing was written' AS INTEGER)::text"
    " END AS hash"
    f" FROM {{prev}} AS p{{subject}}, (SELECT ts, {_AT_TEXT} AS at_text"
    " FROM (SELECT clock_timestamp() AT TIME ZONE 'UTC' AS ts) AS n) AS t)"
)
_ROW_INSERT = (
    "SELECT seq, at, CAST(:actor{i} AS VARCHAR), CAST(:via{i} AS VARCHAR), CAST(:action{i} AS VARCHAR),"
    " override_id, CAST(:before{i} AS JSON), CAST(:after{i} AS JSON), CAST(:comment{i} AS VARCHAR), prev_hash, hash"
    " FROM r{i}"
)
_ROW_RESULT = "SELECT seq, at, prev_hash, hash FROM r{i}"
_HEAD = "head AS (SELECT seq, hash FROM audit_head WHERE id = 1{after} FOR UPDATE)"
_CHAIN = (
    "{rows}, appended AS (INSERT INTO audit_event (seq, at, actor, via, action, override_id, before, after, "
    "comment, prev_hash, hash) {inserts}), "
    "moved AS (UPDATE audit_head SET seq = {last}.seq, hash = {last}.hash FROM {last} WHERE audit_head.id = 1)"
)
_APPENDS: dict[int, sa.TextClause] = {}
_ROWS_PER_STATEMENT = 16


def _chain(count: int, *, about_subject: bool) -> str:
    """The CTEs that lock the head, chain and insert `count` rows and move the head; with `about_subject`,
    the rows are about the row a CTE named `subject` inserts (see `append_with`)."""
    rows = range(count)
    if about_subject:
        override_id, b, subject = "o.id", ":b{i} || convert_to(o.id::text, 'UTF8') || :e{i}", ", subject AS o"
    else:
        override_id, b, subject = "CAST(:override_id{i} AS INTEGER)", ":b{i}", ""
    ctes = [
        _HEAD.format(after=" AND EXISTS (SELECT FROM subject)" if about_subject else ""),
        *(
            _ROW_CTE.format(
                i=i,
                override_id=override_id.format(i=i),
                b=b.format(i=i),
                checked=_AT_CHECKED,
                prev="head" if i == 0 else f"r{i - 1}",
                subject=subject,
            )
            for i in rows
        ),
    ]
    return _CHAIN.format(
        rows=", ".join(ctes), inserts=" UNION ALL ".join(_ROW_INSERT.format(i=i) for i in rows), last=f"r{count - 1}"
    )


def _results(count: int) -> str:
    return " UNION ALL ".join(_ROW_RESULT.format(i=i) for i in range(count))


def _append_statement(count: int) -> sa.TextClause:
    statement = _APPENDS.get(count)
    if statement is None:
        sql = f"WITH {_chain(count, about_subject=False)} {_results(count)} ORDER BY seq"
        statement = _APPENDS[count] = sa.text(sql)
    return statement


def append_with(subject: str, count: int) -> str:
    """PostgreSQL: one statement that inserts a row (`subject`, an INSERT … RETURNING that returns one row
    with its `id`) and appends `count` audit entries about it (their `override_id` is the new row's id,
    which only the INSERT decides: the hashed text is put together around it too). Its row: the subject's
    (PostgreSQL runs the appending CTEs to completion though the query reads none of them). Parameters:
    `append_parameters`. It checks itself: it may be committed with no look at its rows (`_AT_CHECKED`).

    The head is locked only once the row is inserted (`EXISTS (SELECT FROM subject)` is a one-time filter,
    evaluated before the head is scanned), the order the ORM's path takes them in: a request that waits on
    another's uniqueness check never holds the chain meanwhile, so two of them cannot deadlock."""
    return f"WITH subject AS ({subject}), {_chain(count, about_subject=True)} SELECT subject.* FROM subject"  # noqa: S608


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def append_parameters(pending: Sequence[Entry], *, about_subject: bool = False) -> dict[str, Any]:
    """The parameters of `append_with`'s statement (`about_subject`) or of `_append_statement`'s."""
    params: dict[str, Any] = {"c": b'","seq":'}
    for i, entry in enumerate(pending):
        # The canonical text in four pieces around `at`, `prev_hash` and `seq` (keys in sorted order), and
        # about a subject in five: its id too (`override_id` is the last key before `prev_hash`).
        params[f"a{i}"] = (
            "\n" + _json_text({"action": entry.action, "actor": entry.actor, "after": entry.after})[:-1] + ',"at":"'
        ).encode()
        if about_subject:
            before = _json_text({"before": entry.before, "comment": entry.comment})[1:-1]
            params[f"b{i}"] = ('",' + before + ',"override_id":').encode()
            params[f"e{i}"] = b',"prev_hash":"'
        else:
            params[f"b{i}"] = (
                '",'
                + _json_text({"before": entry.before, "comment": entry.comment, "override_id": entry.override_id})[1:-1]
                + ',"prev_hash":"'
            ).encode()
            params[f"override_id{i}"] = entry.override_id
        params[f"d{i}"] = ("," + _json_text({"via": entry.via})[1:]).encode()
        _check_pieces(entry, params, i, about_subject)
        params |= {
            f"actor{i}": entry.actor,
            f"via{i}": entry.via,
            f"action{i}": entry.action,
            # As the engine writes JSON columns (app/core/db.py compact_json); None is JSON null, as before.
            f"before{i}": compact_json(entry.before),
            f"after{i}": compact_json(entry.after),
            f"comment{i}": entry.comment,
        }
    return params


# Sample values of what only the statement decides, each written as the server writes it (see `_AT_CHECKED`).
_SAMPLE_AT, _SAMPLE_SEQ, _SAMPLE_ID, _SAMPLE_HASH = datetime(2000, 1, 2, 3, 4, 5, 6, tzinfo=UTC), 7, 11, "f" * 64
_SAMPLE_AT_TEXT = _SAMPLE_AT.isoformat()


def _check_pieces(entry: Entry, params: dict[str, Any], i: int, about_subject: bool) -> None:
    """Raise unless entry `i`'s pieces, joined around sample values as the statement joins them, are the
    canonical text of that sample row (`chain_hash` hashes the previous hash, a newline and that text)."""
    at, prev = _SAMPLE_AT_TEXT.encode(), _SAMPLE_HASH.encode()
    if about_subject:
        entry = replace(entry, override_id=_SAMPLE_ID)
        subject = b"%d%b" % (_SAMPLE_ID, params[f"e{i}"])
    else:
        subject = b""
    joined = (
        params[f"a{i}"] + at + params[f"b{i}"] + subject + prev + params["c"] + b"%d" % _SAMPLE_SEQ + params[f"d{i}"]
    )
    sample = _row(entry, _SAMPLE_SEQ, _SAMPLE_AT, _SAMPLE_HASH) | {"at": _SAMPLE_AT_TEXT}
    if joined != b"\n" + canonical(sample):
        raise RuntimeError(f"the audit entry {entry.action} would not hash as it verifies; nothing was written")


def _check_written(pending: Sequence[Entry], written: Iterable[tuple[int, datetime, str, str]]) -> None:
    for entry, (seq, at, prev_hash, digest) in zip(pending, written, strict=True):
        row = _row(entry, seq, at.replace(tzinfo=UTC), prev_hash)
        if chain_hash(prev_hash, row | {"at": row["at"].isoformat()}) != digest:
            raise RuntimeError(f"the audit row {seq} was hashed differently by the database; nothing was written")


def _append_in_one_statement(connection: sa.Connection, pending: list[Entry]) -> None:
    written = connection.execute(_append_statement(len(pending)), append_parameters(pending)).all()
    _check_written(pending, written)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


class VerifyResult(BaseModel):
    valid: bool
    checked: int
    first_broken: int | None
    reason: str | None = None
    checkpoints: int = Field(default=0, description="Signed checkpoints checked against the trail.")
    anchored_through: int | None = Field(
        default=None,
        description="The last row a verified checkpoint covers. Rows after it are only as trustworthy as the "
        "database: compare the trail with the latest checkpoint published to the log or the webhooks.",
    )


def verify_events(
    events: Iterable[dict[str, Any]],
    keys: Mapping[str, PublicKey],
    published: Sequence[Checkpoint] = (),
    head: tuple[int, str] | None = None,
) -> VerifyResult:
    """Recompute the chain in sequence order; check each checkpoint in it and each published one given.

    The chain shows a changed row; a checkpoint (signed, so out of a forger's reach) shows a trail that
    was rewritten and re-hashed as a whole; a published checkpoint beyond the trail's end shows rows cut
    off the end. `first_broken` names the first row that cannot be trusted."""
    prev_hash, checked, signed, anchored = GENESIS_HASH, 0, 0, 0

    def result(first_broken: int | None = None, reason: str | None = None) -> VerifyResult:
        return VerifyResult(
            valid=reason is None,
            checked=checked,
            first_broken=first_broken,
            reason=reason,
            checkpoints=signed,
            anchored_through=anchored or None,
        )

    expected: dict[int, Checkpoint] = {}
    for checkpoint in published:
        problem = _signature_problem(checkpoint, keys, f"the published checkpoint of seq {checkpoint.seq}")
        if problem:
            return result(reason=problem)
        if expected.setdefault(checkpoint.seq, checkpoint).hash != checkpoint.hash:
            return result(reason=f"two validly signed checkpoints disagree about seq {checkpoint.seq}")
    try:
        for event_row in events:
            seq = event_row.get("seq")
            if seq != checked + 1:
                return result(checked + 1, f"sequence gap: expected {checked + 1}, found {seq}")
            if event_row.get("prev_hash") != prev_hash:
                return result(seq, "prev_hash does not link")
            digest = event_row.get(_DIGEST) or chain_hash(prev_hash, event_row)
            if digest != event_row.get("hash"):
                return result(seq, "hash does not match content")
            if event_row.get("action") == CHECKPOINT_ACTION:
                broken = _checkpoint_event_problem(event_row, prev_hash, anchored, keys)
                if broken:
                    return result(*broken)
                signed, anchored = signed + 1, seq - 1
            signed_here = expected.get(seq)
            if signed_here is not None:
                if signed_here.hash != event_row["hash"]:
                    return result(
                        anchored + 1, _rewritten(seq, anchored, f"the checkpoint published at {signed_here.at}")
                    )
                signed, anchored = signed + 1, seq
            prev_hash, checked = event_row["hash"], checked + 1
    except ExportFormatError as exc:
        return result(checked + 1, str(exc))
    if expected and max(expected) > checked:
        cut = expected[max(expected)]
        return result(
            checked + 1,
            f"rows were cut off the end: the trail ends at seq {checked}, but a checkpoint signed at {cut.at} "
            f"covers seq {cut.seq}",
        )
    if head is not None and (head[0] != checked or head[1] != prev_hash):
        return result(checked + 1, f"chain head is at {head[0]} but the trail ends at {checked}")
    return result()


def _signature_problem(checkpoint: Checkpoint, keys: Mapping[str, PublicKey], what: str) -> str | None:
    key = keys.get(checkpoint.key_id)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none was given"
        return f"{what} is signed by key {checkpoint.key_id}, which is not a trusted key ({trusted})"
    if not key.verifies(checkpoint):
        return f"{what} has a bad signature (key {checkpoint.key_id})"
    return None


def _checkpoint_event_problem(
    event_row: dict[str, Any], prev_hash: str, anchored: int, keys: Mapping[str, PublicKey]
) -> tuple[int, str] | None:
    """A checkpoint event signs the row right before it (it is written under the chain's lock).
    Returns the first row that cannot be trusted and why, or None."""
    seq = event_row["seq"]
    try:
        checkpoint = Checkpoint.model_validate(event_row.get("after"))
    except ValidationError:
        return seq, f"the checkpoint at seq {seq} is malformed"
    problem = _signature_problem(checkpoint, keys, f"the checkpoint at seq {seq}")
    if problem:
        return seq, problem
    if checkpoint.seq != seq - 1:
        return seq, f"the checkpoint at seq {seq} signs seq {checkpoint.seq}, not the row before it"
    if checkpoint.hash != prev_hash:
        return anchored + 1, _rewritten(seq - 1, anchored, f"the checkpoint at seq {seq}")
    return None


def _rewritten(seq: int, anchored: int, by: str) -> str:
    since = f" after seq {anchored}" if anchored else ""
    return f"the trail was rewritten{since} and re-hashed: the hash of seq {seq} differs from the one signed in {by}"


def iter_events(session: Session, batch: int = 1000, **filters: Any) -> Iterator[AuditEvent]:
    last = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > last)
        for name, value in filters.items():
            if value is not None:
                query = query.where(getattr(AuditEvent, name) == value)
        rows = session.exec(query.order_by(col(AuditEvent.seq)).limit(batch)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def exported_rows(session: Session, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """The whole trail in sequence order, each row as `as_dict` gives it (on PostgreSQL in one streamed
    statement: no ORM object per row)."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        for event_row in iter_events(session, batch):
            yield as_dict(event_row)
        return
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    size = batch if psycopg.capabilities.has_stream_chunked() else 1
    stream = driver.cursor().stream(f"SELECT {_COLUMNS} FROM audit_event ORDER BY seq", size=size)  # noqa: S608
    for seq, at, actor, via, action, override_id, before, after, comment, prev_hash, stored in stream:
        yield {
            "seq": seq,
            "at": _naive_utc_text(at),
            "actor": actor,
            "via": via,
            "action": action,
            "override_id": override_id,
            "before": before,
            "after": after,
            "comment": comment,
            "prev_hash": prev_hash,
            "hash": stored,
        }


def verify_chain(session: Session, keys: Mapping[str, PublicKey], published: Sequence[Checkpoint] = ()) -> VerifyResult:
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        # The head and the rows from one snapshot: with rows appended between the two reads, a sound
        # trail would look longer than its head.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    head = session.get(AuditHead, 1)
    return verify_events(_hashed_rows(session), keys, published, (head.seq, head.hash) if head else None)


_DIGEST = "_digest"  # a row's hash as recomputed while it was read (see `_hashed_rows`)
_HASHED = (
    '%s\n{"action":%s,"actor":%s,"after":%s,"at":%s,"before":%s,"comment":%s,"override_id":%s,"prev_hash":%s,'
    '"seq":%d,"via":%s}'
)
_COLUMNS = "seq, at, actor, via, action, override_id, before, after, comment, prev_hash, hash"


def _hashed_rows(session: Session, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """The trail in sequence order, each row with its recomputed hash, for `verify_events`: fast.

    The JSON columns are read as the text they were stored as, which is already canonical (`record` sorts
    the keys, the engine writes JSON compact: app/core/db.py), so the hashed form is put together from the columns
    as they are, without parsing and re-encoding. If that does not give the row's hash (a row written in
    another form, or one that was changed), the row is hashed the reference way (`chain_hash`), so the
    verdict is exactly the reference's; only the speed differs."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        yield from _hash_rows(_batched_rows(connection, batch), _naive_utc_text, _naive_utc_text)
        return
    rows, reference_at = _streamed_rows(connection, batch)
    try:
        yield from _hash_rows(rows, _pg_timestamp_text, reference_at)
    finally:
        # Read to the end: a stream closed early cancels its statement, and with it the transaction.
        for _ in rows:
            pass


def _hash_rows(
    rows: Iterable[Sequence[Any]], at_text: Callable[[Any], str], at_value: Callable[[Any], str]
) -> Iterator[dict[str, Any]]:
    encode = encode_basestring
    sha256 = hashlib.sha256
    for seq, at, actor, via, action, override_id, before, after, comment, prev_hash, stored in rows:
        digest = sha256(
            (
                _HASHED
                % (
                    prev_hash,
                    encode(action),
                    encode(actor),
                    after or "null",
                    encode(at_text(at)),
                    before or "null",
                    "null" if comment is None else encode(comment),
                    "null" if override_id is None else override_id,
                    encode(prev_hash),
                    seq,
                    "null" if via is None else encode(via),
                )
            ).encode()
        ).hexdigest()
        row: dict[str, Any] = {"seq": seq, "prev_hash": prev_hash, "hash": stored, "action": action}
        if digest != stored or action == CHECKPOINT_ACTION:
            row |= {
                "at": at_value(at),
                "actor": actor,
                "via": via,
                "override_id": override_id,
                "before": None if before is None else json.loads(before),
                "after": None if after is None else json.loads(after),
                "comment": comment,
            }
            digest = chain_hash(prev_hash, row)
        row[_DIGEST] = digest
        yield row


def _naive_utc_text(at: datetime) -> str:
    return at.isoformat() + "+00:00"  # as an aware UTC time writes itself


def _batched_rows(connection: sa.Connection, batch: int) -> Iterator[Sequence[Any]]:
    columns = [
        _EVENTS.c.seq,
        sa.type_coerce(_EVENTS.c.at, sa.DateTime()),  # naive UTC as stored: no conversion per row
        _EVENTS.c.actor,
        _EVENTS.c.via,
        _EVENTS.c.action,
        _EVENTS.c.override_id,
        sa.cast(_EVENTS.c.before, sa.Text()),
        sa.cast(_EVENTS.c.after, sa.Text()),
        _EVENTS.c.comment,
        _EVENTS.c.prev_hash,
        _EVENTS.c.hash,
    ]
    last = 0
    while True:
        query = sa.select(*columns).where(_EVENTS.c.seq > last).order_by(_EVENTS.c.seq).limit(batch)
        rows = connection.execute(query).all()
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def _streamed_rows(connection: sa.Connection, batch: int) -> tuple[Iterator[Sequence[Any]], Callable[[str], str]]:
    """PostgreSQL: the whole trail in one statement, streamed (the server reads ahead while the rows are
    hashed), `at` and the JSON columns as the text the server sends. Returns the rows and the reference
    reading of `at` (the driver's own datetime, as `isoformat()` writes it)."""
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    timestamp = driver.adapters.types["timestamp"].oid
    parse = driver.adapters.get_loader(timestamp, pq.Format.TEXT)(timestamp, driver)  # type: ignore[misc]
    cursor = driver.cursor()
    cursor.adapters.register_loader("timestamp", TextLoader)
    cursor.adapters.register_loader("json", TextLoader)
    size = batch if psycopg.capabilities.has_stream_chunked() else 1
    rows = cursor.stream(f"SELECT {_COLUMNS} FROM audit_event ORDER BY seq", size=size)  # noqa: S608

    def reference(text: str) -> str:
        return _naive_utc_text(parse.load(text.encode()))

    return rows, reference


def _pg_timestamp_text(text: str) -> str:
    """`timestamp` as PostgreSQL writes it (DateStyle ISO: "2026-01-02 03:04:05.5", the fraction's trailing
    zeros dropped) put as `datetime.isoformat()` writes that time in UTC. Any other text comes out
    different from the hashed form, and the row is hashed the reference way."""
    if 19 < len(text) < 26:
        text = text.ljust(26, "0")
    return text.replace(" ", "T", 1) + "+00:00"
