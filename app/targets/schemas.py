"""API shapes of the targets endpoints (a target's key is never part of any of them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.overrides.models import OverrideState
from app.overrides.schemas import QueueEvidenceRead


class TargetRead(BaseModel):
    name: str
    configured: bool = Field(description="A URL and an API key are configured for it.")
    url: str | None
    last_reconcile_at: datetime | None
    last_reconcile_error: str | None
    paused_until: datetime | None = Field(
        description="Calls with the configured API key are paused until then: mailcow refused it (it bans an IP "
        "after 10 failed logins). A corrected key, or `POST /v1/targets/{name}/resume`, ends the pause."
    )
    pause_reason: str | None = Field(default=None, description="What mailcow answered, while paused.")
    rows_owned: int = Field(description="Rows owned by overrides at the last reconcile.")
    rows_foreign: int = Field(description="Other rows (inventory, never touched) at the last reconcile.")


class PolicyRowRead(BaseModel):
    id: int
    dest: str
    policy: str
    parameters: str
    active: int
    created: str | None
    modified: str | None
    owned_by: int | None = Field(
        description="The override that owns this row; null for rows tlsoverride did not write."
    )
    override_state: OverrideState | None
    conflict_of: int | None = Field(description="An approved override this foreign row blocks (open conflict).")
    drift: dict[str, Any] | None = Field(description="How an owned row differs from its override (null: it does not).")


class MissingRowRead(BaseModel):
    override_id: int
    destination: str
    policy: str
    parameters: str
    mailcow_id: int | None
    drift: dict[str, Any] = Field(description="`missing`, `recreated` (same content, new id) or `replaced`.")


class TargetPolicies(BaseModel):
    target: TargetRead
    fetched_at: datetime
    rows: list[PolicyRowRead] = Field(description="The live policy map, by destination.")
    missing: list[MissingRowRead] = Field(description="Active overrides whose row is not in the map.")


class TargetQueue(BaseModel):
    """What a target's mail queue holds deferred: counts, delay reasons and times, never addresses."""

    target: str
    fetched_at: datetime
    queued: int = Field(description="Messages in the queue (all of Postfix's queues), as mailcow lists them.")
    deferred: int = Field(description="Of those, messages in the deferred queue.")
    capped: bool = Field(description="mailcow lists at most 10,000 messages: the counts may be higher.")
    destinations: list[QueueEvidenceRead] = Field(
        description="The destination asked for; without one, each recipient domain with deferred mail, most "
        "recipients first (at most 200)."
    )
