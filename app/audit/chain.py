"""The audit trail's hashed form: an entry as it is stored, and the bytes that chain it (`chain_hash`).

Pure functions, no database: `app/audit/service.py` appends and verifies with them, and an auditor's
offline check of an export hashes exactly as they do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from app.audit.models import AuditEvent


@dataclass(frozen=True)
class Entry:
    actor: str
    via: str | None
    action: str
    override_id: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    comment: str | None


def new_entry(
    *,
    actor: str,
    action: str,
    via: str | None = None,
    override_id: int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    comment: str | None = None,
) -> Entry:
    """An audit entry as it will be stored (for `record`, and for `append_with`'s statement)."""
    # "" and None must not both exist: a CSV export could not tell them apart when re-hashed offline.
    return Entry(actor, via or None, action, override_id, _jsonable(before), _jsonable(after), comment or None)


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    # Keys sorted: stored so (app/core/db.py compact_json), the row's text is the hashed form itself.
    result: dict[str, Any] = json.loads(json.dumps(value, default=_default, sort_keys=True))
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
