"""Reading a target's mail queue (mailcow-api.md §12) for reviewers: on a new request (within a budget,
never blocking it), for `GET /v1/targets/{name}/queue`, and in the worker's refresh of pending and active
overrides. What it says about a destination is decided in `app.overrides.stuck` (pure); only counts,
reasons and times are stored or answered.

A target paused after mailcow refused our key is not called (mailcow bans an IP after 10 failed logins);
a refusal met here pauses it like any other call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio.from_thread
from sqlalchemy import Engine, and_, not_
from sqlmodel import Session, col, select

from app.core.config import Settings
from app.core.db import reading, utcnow
from app.core.errors import InvalidInput, NotFound, ServiceUnavailable
from app.mailcow.errors import MailcowAuthError, MailcowError
from app.mailcow.queue import QueueMessage, capped
from app.mailcow.targets import Target, configured_targets
from app.overrides.evidence import WouldBlock
from app.overrides.lifecycle import find_live
from app.overrides.models import Override, OverrideState
from app.overrides.permissions import ActionContext
from app.overrides.postfix import PolicyInputError, normalise_destination
from app.overrides.schemas import QueueEvidenceRead
from app.overrides.stuck import QueueEvidence, queue_error, queue_evidence
from app.targets.models import MailcowTarget
from app.targets.schemas import TargetQueue
from app.targets.service import is_paused, pause_target

log = logging.getLogger("app.targets.queue")

# Overrides whose destination's queue is watched: a request under review, and one applied (release and
# the still-stuck check build on it).
WATCHED_STATES = (OverrideState.pending, OverrideState.approved, OverrideState.active)
MAX_DESTINATIONS = 200  # per-destination view without a destination: the busiest first


async def read_queue(config: Target, settings: Settings, budget: float | None = None) -> list[QueueMessage]:
    """The target's queue now, one HTTP attempt (a caller waits for it), within `budget` seconds."""
    async with config.client(settings, attempts=1) as client:
        work = client.get_mailq()
        return await (work if budget is None else asyncio.wait_for(work, budget))


def describe_failure(error: BaseException, budget: float | None = None) -> str:
    """What a reviewer reads instead of counts (never the answer's body: it may hold addresses)."""
    if isinstance(error, TimeoutError):
        return f"the mail queue was not read within {budget:g} s" if budget else "reading the mail queue timed out"
    if isinstance(error, MailcowError):
        return f"mailcow's mail queue could not be read ({error.kind}: {error.message})"[:500]
    return f"the mail queue could not be read ({type(error).__name__})"


def _paused(engine: Engine, config: Target) -> bool:
    with reading(engine) as session:
        return is_paused(session.get(MailcowTarget, config.name), config)


def queue_on_create(
    ctx: ActionContext, target: str, destination: str, time_limit: float | None = None, *, blocking: bool = True
) -> dict[str, Any] | None:
    """The queue evidence stored with a new request (from a worker thread of the API), or None when it is
    not read: turned off, a replay or a 409 to come. A failure is recorded in it, never raised. With
    `blocking=False` (the event loop), `WouldBlock` instead of any I/O."""
    settings = ctx.settings
    budget = settings.queue_evidence_budget_seconds
    if time_limit is not None:
        budget = min(budget, time_limit)
    if budget <= 0:
        return None
    if not blocking and (settings.mailcow_url or settings.mailcow_targets):
        raise WouldBlock  # a key file to read (`configured_targets`), then the database and mailcow
    now = utcnow()
    config = configured_targets(settings).get(target)
    if config is None:
        # No mailcow to spare a call: no look at the database first (a replay or a 409 drops this anyway).
        return queue_error(destination, now, f"target {target} has no mailcow URL or API key configured").as_json()
    with reading(ctx.engine) as peek:  # one snapshot for the three looks: one BEGIN, one ROLLBACK
        if (ctx.idempotency is not None and ctx.idempotency.answered(peek)) or find_live(peek, target, destination):
            return None
        paused = is_paused(peek.get(MailcowTarget, config.name), config)
    if paused:
        return queue_error(destination, now, "calls to the target are paused: mailcow refused our API key").as_json()
    try:
        messages = anyio.from_thread.run(read_queue, config, settings, budget)
    except Exception as exc:  # evidence is best effort: an urgent request never waits on mailcow's queue
        if isinstance(exc, MailcowAuthError):
            pause_target(ctx.engine, config, settings.mailcow_auth_backoff_seconds, exc.message)
        log.warning("reading the mail queue of %s for a request failed: %s", target, describe_failure(exc, budget))
        return queue_error(destination, utcnow(), describe_failure(exc, budget)).as_json()
    return queue_evidence(messages, destination, utcnow()).as_json()


async def target_queue(engine: Engine, settings: Settings, name: str, destination: str | None) -> TargetQueue:
    """`GET /v1/targets/{name}/queue`: what is deferred for `destination`, or for each recipient domain."""
    if name not in settings.target_names():
        raise NotFound(f"There is no target {name!r}.")
    wanted = None
    if destination is not None:
        try:
            wanted = normalise_destination(destination, allow_subdomains=True, field="destination")
        except PolicyInputError as exc:
            raise InvalidInput.on(f"query.{exc.field}", exc.message) from exc
    config = configured_targets(settings).get(name)
    if config is None:
        raise ServiceUnavailable(f"Target {name!r} has no mailcow URL or API key configured.")
    if await asyncio.to_thread(_paused, engine, config):
        raise ServiceUnavailable(f"Calls to {name} are paused: mailcow refused our API key.")
    try:
        messages = await read_queue(config, settings)
    except MailcowAuthError as exc:
        await asyncio.to_thread(pause_target, engine, config, settings.mailcow_auth_backoff_seconds, exc.message)
        raise ServiceUnavailable(f"mailcow {name} rejected our API key; calls are paused.") from exc
    except MailcowError as exc:
        raise ServiceUnavailable(f"mailcow {name} did not answer usefully ({exc.kind}).") from exc
    now = utcnow()
    found = [queue_evidence(messages, wanted, now)] if wanted is not None else per_domain(messages, now)
    return TargetQueue(
        target=name,
        fetched_at=now,
        queued=len(messages),
        deferred=sum(1 for m in messages if m.deferred),
        capped=capped(messages),
        destinations=[QueueEvidenceRead.model_validate(e.as_json()) for e in found],
    )


def per_domain(messages: Sequence[QueueMessage], now: datetime) -> list[QueueEvidence]:
    """The evidence for every recipient domain with deferred mail, most recipients first (each domain's
    evidence made from its own messages: one pass over the queue, not one per domain)."""
    by_domain: dict[str, list[QueueMessage]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for message in messages:
        if message.deferred:
            for domain in dict.fromkeys(r.domain for r in message.recipients):
                by_domain[domain].append(message)
            for recipient in message.recipients:
                counts[recipient.domain] += 1
    busiest = sorted(counts, key=lambda d: (-counts[d], d))[:MAX_DESTINATIONS]
    full = capped(list(messages))
    return [replace(queue_evidence(by_domain[domain], domain, now), capped=full) for domain in busiest]


# ---- the worker's refresh ---------------------------------------------------------------------------


def watched(engine: Engine, target: str, older_than: datetime) -> list[tuple[int, str]]:
    """(id, destination) of the target's watched overrides whose queue evidence is older than `older_than`
    (or missing); an empty list means the queue need not be read for this target now."""
    # An active override whose queue pass is scheduled gets its evidence from that pass's check, together
    # with its `still_stuck` flag (app/worker/release.py), so that the two never disagree.
    checked_by_its_pass = and_(col(Override.state) == OverrideState.active, col(Override.queue_due_at).is_not(None))
    with Session(engine) as session:
        rows = session.exec(
            select(Override.id, Override.destination, Override.queue)
            .where(Override.target == target, col(Override.state).in_(WATCHED_STATES))
            .where(not_(checked_by_its_pass))
        ).all()
    return [
        (row_id, destination)
        for row_id, destination, queue in rows
        if row_id is not None and not _checked_since(queue, older_than)
    ]


def _checked_since(queue: Any, moment: datetime) -> bool:
    try:
        return bool(queue) and datetime.fromisoformat(str(queue["checked_at"])) > moment
    except (KeyError, TypeError, ValueError):
        return False
