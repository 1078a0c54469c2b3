"""`Idempotency-Key`: a retried request gets the first answer instead of a second change.

The key is claimed by inserting its record *before* the work runs, in the same transaction: a
concurrent duplicate waits on the unique index, then finds the finished record and replays it. A
request that fails (4xx/5xx problem) rolls back with its claim, so it can be retried with the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy import JSON, Column, UniqueConstraint, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select
from sqlmodel.sql.expression import SelectOfScalar

from app.core.auth import Principal
from app.core.db import UTCDateTime, utcnow
from app.core.errors import IdempotencyMismatch

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_MAX_LENGTH = 200
# Visible ASCII, inner spaces allowed: what arrives intact (HTTP strips outer blanks, and other bytes are
# not portable in a header).
KEY_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=KEY_MAX_LENGTH,
        pattern=KEY_PATTERN,
        description=(
            f"Makes a retry safe: 1 to {KEY_MAX_LENGTH} visible ASCII characters (inner spaces allowed), "
            "e.g. a UUID, chosen by the client per intended change. The first answer to a request with the key "
            f"is kept for `TLSO_IDEMPOTENCY_TTL` (default 24 h) per caller (an integration and the user it acts "
            f"for count as one caller); a retry with the same key, method, path and body gets that answer again, "
            f"status, body and headers, with `{REPLAYED}: true`, and changes nothing. The same key with another "
            "request is refused (422, `idempotency-key-reused`). A request that failed keeps nothing: retrying "
            "it with the same key runs it again. Two requests with one key at the same time: the second waits "
            "for the first and gets its answer."
        ),
    ),
]
REPLAYED_HEADER = {
    REPLAYED: {
        "description": f"`true` when this is the kept answer to an earlier request with this `{HEADER}`.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


class IdempotencyRecord(SQLModel, table=True):
    """The first answer to a request sent with an `Idempotency-Key`, replayed on retries."""

    __tablename__ = "idempotency_record"
    __table_args__ = (UniqueConstraint("principal", "key", name="uq_idempotency_principal_key"),)

    id: int | None = Field(default=None, primary_key=True)
    principal: str = Field(max_length=400)
    key: str = Field(max_length=200)
    fingerprint: str = Field(max_length=64)
    status_code: int
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    headers: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


def fingerprint(method: str, path: str, body: Any) -> str:
    payload = json.dumps([method, path, body], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _replay(record: IdempotencyRecord, print_: str) -> JSONResponse:
    if record.fingerprint != print_:
        raise IdempotencyMismatch(f"{HEADER} was first used for a different request.")
    return JSONResponse(record.body, status_code=record.status_code, headers={**record.headers, REPLAYED: "true"})


def _owner(principal: Principal) -> str:
    return f"{principal.via or ''}|{principal.key}"


def _record_of(owner: str, key: str) -> SelectOfScalar[IdempotencyRecord]:
    return select(IdempotencyRecord).where(IdempotencyRecord.principal == owner, IdempotencyRecord.key == key)


def already_used(session: Session, principal: Principal, key: str | None) -> bool:
    """Whether this caller's key already has an answer (the request will be a replay)."""
    return key is not None and session.exec(_record_of(_owner(principal), key)).first() is not None


def run_idempotent(
    session: Session,
    principal: Principal,
    key: str | None,
    print_: str,
    work: Callable[[], tuple[int, dict[str, Any], dict[str, str]]],
    ttl: timedelta,
) -> JSONResponse:
    """Run `work` once per (caller, key); replay its answer for later requests with that key (the key was
    checked against `IdempotencyKey` where it came in)."""
    if key is None:
        status, body, headers = work()
        return JSONResponse(body, status_code=status, headers=headers)
    owner = _owner(principal)
    session.execute(delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < utcnow() - ttl))
    query = _record_of(owner, key)
    found = session.exec(query).first()
    if found is not None:
        return _replay(found, print_)
    claim = IdempotencyRecord(
        principal=owner, key=key, fingerprint=print_, status_code=0, body={}, headers={}, created_at=utcnow()
    )
    session.add(claim)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        return _replay(session.exec(query).one(), print_)
    status, body, headers = work()
    claim.status_code, claim.body, claim.headers = status, body, headers
    session.add(claim)
    return JSONResponse(body, status_code=status, headers=headers)
