"""`Idempotency-Key`: a retried request gets the first answer instead of a second change.

The service claims the key by inserting its record right *before* the change, in the change's own
transaction: a concurrent duplicate waits on the unique index, then finds the finished record and
replays it. A request that fails (4xx/5xx problem) rolls back with its claim, so it can be retried with
the same key. The answer kept is the one the route returns (its model, status and headers), and a
replay is that answer again, validated by the same model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Header, Response
from pydantic import BaseModel
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


class Replay(Exception):
    """The request repeats one (same caller, same key) that already has its answer: that answer, again."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__(f"{HEADER} already answered")
        self.status_code, self.body, self.headers = record.status_code, record.body, record.headers


@dataclass
class Idempotency:
    """One request's `Idempotency-Key`, checked against `IdempotencyKey` where it came in."""

    principal: Principal
    key: str
    fingerprint: str
    ttl: timedelta
    _claim: tuple[Session, IdempotencyRecord] | None = field(default=None, init=False, repr=False)

    @property
    def owner(self) -> str:
        # An integration and the user it acts for count as one caller.
        return f"{self.principal.via or ''}|{self.principal.key}"

    def _record(self) -> SelectOfScalar[IdempotencyRecord]:
        return select(IdempotencyRecord).where(
            IdempotencyRecord.principal == self.owner, IdempotencyRecord.key == self.key
        )

    def answered(self, session: Session) -> bool:
        """Whether the key already has an answer (the request will be a replay); any session will do."""
        return session.exec(self._record()).first() is not None

    def claim(self, session: Session) -> None:
        """Claim the key before the change, in its transaction; raise `Replay` when it already has an answer."""
        session.execute(delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < utcnow() - self.ttl))
        found = session.exec(self._record()).first()
        if found is None:
            claim = IdempotencyRecord(
                principal=self.owner,
                key=self.key,
                fingerprint=self.fingerprint,
                status_code=0,
                body={},
                headers={},
                created_at=utcnow(),
            )
            session.add(claim)
            try:
                session.flush()
            except IntegrityError:  # a concurrent request with the key finished first
                session.rollback()
                found = session.exec(self._record()).one()
            else:
                self._claim = (session, claim)
                return
        if found.fingerprint != self.fingerprint:
            raise IdempotencyMismatch(f"{HEADER} was first used for a different request.")
        raise Replay(found)

    def keep(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        """The change's answer, kept with the claim for the retries."""
        if self._claim is not None:
            session, claim = self._claim
            claim.status_code, claim.body, claim.headers = status, body, headers
            session.add(claim)


Answer = TypeVar("Answer", bound=BaseModel)


def answer_once(
    idempotency: Idempotency | None,
    response: Response,
    status: int,
    model: type[Answer],
    change: Callable[[], tuple[Answer, dict[str, str]]],
) -> Answer:
    """The answer to a change and its headers, kept for retries with the same key; a retry gets the kept
    answer again (with `Idempotent-Replayed: true`), validated by `model` as the first one was."""
    try:
        answer, headers = change()
    except Replay as replay:
        response.status_code = replay.status_code
        response.headers.update({**replay.headers, REPLAYED: "true"})
        return model.model_validate(replay.body)
    response.status_code = status
    response.headers.update(headers)
    if idempotency is not None:
        idempotency.keep(status, answer.model_dump(mode="json"), headers)
    return answer
