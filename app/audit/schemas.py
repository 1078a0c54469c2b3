"""The public API shapes of the audit trail: its events, and what verifying it takes and gives."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.audit.signing import Checkpoint


class EventRead(BaseModel):
    seq: int
    at: datetime
    actor: str
    via: str | None
    action: str
    override_id: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    comment: str | None
    prev_hash: str
    hash: str


class EventPage(BaseModel):
    items: list[EventRead]
    next_cursor: str | None


class PublishedCheckpoints(BaseModel):
    checkpoints: list[Checkpoint] = Field(
        min_length=1,
        max_length=100,
        description="Checkpoints as published in the log or to a webhook (the `after` of `audit.checkpoint`).",
    )


class AuditKey(BaseModel):
    key_id: str
    algorithm: str = Field(examples=["Ed25519"])
    public_key: str = Field(description="The 32 raw bytes of the public key, base64.")


class AuditKeys(BaseModel):
    keys: list[AuditKey]
