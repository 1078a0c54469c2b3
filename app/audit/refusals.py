"""Refused attempts on record without flooding the trail: the one rule both kinds of refusal use.

Per caller (actor and via, as given), override and attempted action, the first
`TLSO_AUDIT_REFUSALS_PER_WINDOW` refusals in a window of `TLSO_AUDIT_REFUSAL_WINDOW_SECONDS` are
recorded in full (`auth.refused`). Further ones in that window are only counted, in
`audit_refusal_tally`, in the same transaction as the refusal; when the window is over, one summary
`auth.refused` row with `after.attempts = n` carries the count — written by the next refusal of that
caller or by the worker, whichever comes first. So the total number of refused attempts is always
provable from the chain: the sum of `after.attempts` over `auth.refused` rows (1 where it is absent),
plus at most one window still open.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.models import RefusalTally
from app.audit.service import record
from app.core.config import CoreSettings
from app.core.db import reading, transaction, utcnow
from app.core.person import person_key

REFUSED = "auth.refused"


def record_refusal(
    engine: Engine,
    settings: CoreSettings,
    *,
    actor: str,
    via: str | None,
    override_id: int | None,
    after: dict[str, Any],
    comment: str | None,
) -> None:
    """Record a refused authorisation in its own transaction, coalesced with a flood of the same."""
    fields: dict[str, Any] = {"actor": actor, "via": via, "override_id": override_id, "after": after}
    if settings.audit_refusal_window_seconds <= 0:
        with transaction(engine) as session:
            record(session, action=REFUSED, comment=comment, **fields)
        return
    for attempt in range(3):
        try:
            with transaction(engine) as session:
                _count(session, settings, comment=comment, **fields)
            return
        except IntegrityError:  # the first refusal of this caller arrived twice at once: count again
            if attempt == 2:
                raise


def _count(
    session: Session,
    settings: CoreSettings,
    *,
    actor: str,
    via: str | None,
    override_id: int | None,
    after: dict[str, Any],
    comment: str | None,
) -> None:
    now = utcnow()
    attempted = str(after.get("attempted", ""))
    # One window per person, not per spelling: variants of a name must not each get their allowance.
    key = hashlib.sha256(json.dumps([person_key(actor), via, override_id, attempted]).encode()).hexdigest()
    tally = session.exec(select(RefusalTally).where(RefusalTally.key == key).with_for_update()).first()
    if tally is not None and now - tally.opened_at < timedelta(seconds=settings.audit_refusal_window_seconds):
        if tally.written >= settings.audit_refusals_per_window:
            tally.suppressed, tally.last_at, tally.last_reason = tally.suppressed + 1, now, comment
            session.add(tally)
            return
        tally.written += 1
    elif tally is not None:  # its window is over: its count goes on record before this refusal
        _summarise(session, tally)
        tally.opened_at, tally.written, tally.suppressed, tally.last_at = now, 1, 0, None
    else:
        tally = RefusalTally(key=key, actor=actor, via=via, override_id=override_id, attempted=attempted, opened_at=now)
    session.add(tally)
    record(session, actor=actor, via=via, action=REFUSED, override_id=override_id, after=after, comment=comment)


def _summarise(session: Session, tally: RefusalTally) -> None:
    if not tally.suppressed:
        return
    record(
        session,
        actor=tally.actor,
        via=tally.via,
        action=REFUSED,
        override_id=tally.override_id,
        after={
            "attempted": tally.attempted,
            "attempts": tally.suppressed,
            "from": tally.opened_at,
            "until": tally.last_at,
        },
        comment=f"{tally.suppressed} more refused attempts, counted instead of recorded one by one "
        f"(the last refused because: {tally.last_reason})",
    )


def close_refusal_windows(engine: Engine, settings: CoreSettings, limit: int = 100) -> int:
    """Put the count of every window that is over on record (the worker calls this); returns how many."""
    cutoff = utcnow() - timedelta(seconds=settings.audit_refusal_window_seconds)
    due = select(RefusalTally).where(col(RefusalTally.opened_at) <= cutoff)
    with reading(engine) as session:  # most of the time there is nothing to do: no write lock for that
        if session.exec(due.limit(1)).first() is None:
            return 0
    with transaction(engine) as session:
        closed = session.exec(due.limit(limit).with_for_update(skip_locked=True)).all()
        for tally in closed:
            _summarise(session, tally)
            session.delete(tally)
    return len(closed)
