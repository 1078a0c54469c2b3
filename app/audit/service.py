"""The hash-chained audit trail: record in the caller's transaction, verify, export.

`record()` queues an entry on the session; the entries are chained and inserted when that session
commits (a `before_commit` hook), after every other write of the transaction. Appending locks the
single `audit_head` row, so concurrent transactions chain one after the other and never fork.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, event
from sqlmodel import Session, col, select

from app.audit.models import GENESIS_HASH, AuditEvent, AuditHead
from app.core.db import transaction, utcnow

_PENDING = "audit_pending"


@dataclass(frozen=True)
class Entry:
    actor: str
    via: str | None
    action: str
    override_id: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    comment: str | None


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
    # "" and None must not both exist: a CSV export could not tell them apart when re-hashed offline.
    entry = Entry(actor, via or None, action, override_id, _jsonable(before), _jsonable(after), comment or None)
    session.info.setdefault(_PENDING, []).append(entry)


def record_alone(engine: Engine, **fields: Any) -> None:
    """Record an event that has no other change to ride with (e.g. a refused authorisation)."""
    with transaction(engine) as session:
        record(session, **fields)


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    result: dict[str, Any] = json.loads(json.dumps(value, default=_default))
    return result


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def canonical(event: dict[str, Any]) -> bytes:
    """The bytes that are hashed: every field but `hash`, as sorted, compact JSON."""
    body = {key: value for key, value in event.items() if key != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, event: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(event)).hexdigest()


def as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "via": event.via,
        "action": event.action,
        "override_id": event.override_id,
        "before": event.before,
        "after": event.after,
        "comment": event.comment,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


@event.listens_for(Session, "before_commit")
def _write_pending(session: Session) -> None:
    pending: list[Entry] = session.info.pop(_PENDING, [])
    if not pending:
        return
    head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
    for entry in pending:
        event_row = AuditEvent(
            seq=head.seq + 1,
            at=utcnow(),
            actor=entry.actor,
            via=entry.via,
            action=entry.action,
            override_id=entry.override_id,
            before=entry.before,
            after=entry.after,
            comment=entry.comment,
            prev_hash=head.hash,
            hash="",
        )
        event_row.hash = chain_hash(head.hash, as_dict(event_row))
        session.add(event_row)
        head.seq, head.hash = event_row.seq, event_row.hash
    session.add(head)
    session.flush()


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


class VerifyResult(BaseModel):
    valid: bool
    checked: int
    first_broken: int | None
    reason: str | None = None


def verify_events(events: Iterable[dict[str, Any]], head: tuple[int, str] | None = None) -> VerifyResult:
    """Recompute the chain over events in sequence order; point at the first broken one."""
    prev_hash, expected_seq, checked = GENESIS_HASH, 1, 0
    for event_row in events:
        seq = event_row.get("seq")
        if seq != expected_seq:
            return VerifyResult(
                valid=False,
                checked=checked,
                first_broken=expected_seq,
                reason=f"sequence gap: expected {expected_seq}, found {seq}",
            )
        if event_row.get("prev_hash") != prev_hash:
            return VerifyResult(valid=False, checked=checked, first_broken=seq, reason="prev_hash does not link")
        if chain_hash(prev_hash, event_row) != event_row.get("hash"):
            return VerifyResult(valid=False, checked=checked, first_broken=seq, reason="hash does not match content")
        prev_hash, expected_seq, checked = event_row["hash"], expected_seq + 1, checked + 1
    if head is not None and (head[0] != checked or head[1] != prev_hash):
        return VerifyResult(
            valid=False,
            checked=checked,
            first_broken=checked + 1,
            reason=f"chain head is at {head[0]} but the trail ends at {checked}",
        )
    return VerifyResult(valid=True, checked=checked, first_broken=None)


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


def verify_chain(session: Session) -> VerifyResult:
    head = session.get(AuditHead, 1)
    return verify_events((as_dict(e) for e in iter_events(session)), (head.seq, head.hash) if head else None)


CSV_FIELDS = [
    "seq",
    "at",
    "actor",
    "via",
    "action",
    "override_id",
    "before",
    "after",
    "comment",
    "prev_hash",
    "hash",
]


def to_jsonl(event_row: dict[str, Any]) -> str:
    return json.dumps(event_row, sort_keys=True, ensure_ascii=False) + "\n"


def to_csv_rows(events: Iterable[dict[str, Any]]) -> Iterator[str]:
    """CSV with `before`/`after` as JSON text, so an export can be re-hashed offline."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    yield buffer.getvalue()
    for event_row in events:
        buffer.seek(0)
        buffer.truncate()
        row = dict(event_row)
        for key in ("before", "after"):
            row[key] = "" if row[key] is None else json.dumps(row[key], sort_keys=True, ensure_ascii=False)
        for key in ("via", "override_id", "comment"):
            row[key] = "" if row[key] is None else row[key]
        writer.writerow(row)
        yield buffer.getvalue()


def parse_export(lines: Iterable[str], fmt: str) -> Iterator[dict[str, Any]]:
    """Read a JSON Lines or CSV export back into events, for offline verification."""
    if fmt == "jsonl":
        for line in lines:
            if line.strip():
                yield json.loads(line)
        return
    for row in csv.DictReader(lines):
        event_row: dict[str, Any] = dict(row)
        event_row["seq"] = int(event_row["seq"])
        event_row["override_id"] = int(event_row["override_id"]) if event_row["override_id"] else None
        for key in ("via", "comment"):
            event_row[key] = event_row[key] or None
        for key in ("before", "after"):
            event_row[key] = json.loads(event_row[key]) if event_row[key] else None
        yield event_row
