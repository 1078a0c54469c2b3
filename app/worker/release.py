"""The queue pass: an active override's deferred mail is released at once, checked a minute later, and
its destination watched after the override ends.

* release: once an override is active, its destination's deferred messages are handed to mailcow's
  `deliver` (`postqueue -i`, by queue id, in batches of `TLSO_QUEUE_RELEASE_BATCH`; never `flush`, never a
  delete), so mail waiting for Postfix's next retry (up to 30 minutes) flows now: `override.queue_released`.
* check, `TLSO_QUEUE_CHECK_SECONDS` later: mail for the destination still deferred with a TLS reason means
  the override does not help: flagged `still_stuck` (`override.still_stuck`, the
  `tlso_overrides_still_stuck` gauge), else `override.queue_clear`.
* watch, for `TLSO_QUEUE_WATCH_SECONDS` after an expired, revoked or remediated end: mail for the
  destination deferred with a TLS reason again raises `recipient.still_failing`, once per episode (an
  episode ends when none is deferred any more). The diagnosis side (`recipient.regressed`) is the
  remediation watch's (app/worker/recheck.py).

One queue read per target and pass serves all its overrides. A pass is leased (`store.claim_queue`), so two
workers never release the same override; its outcome and audit entry are recorded in one transaction
(`store.move_queue_release`). A failed queue call is sorted by app/worker/failures.py: never given up.
Which messages concern a destination, and which delay reasons are TLS's, are app/overrides/stuck.py's rules.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from app.core.db import utcnow
from app.core.metrics import WORKER_JOBS
from app.mailcow.client import MailcowClient
from app.mailcow.errors import MailcowError
from app.mailcow.queue import QueueMessage, capped
from app.overrides import lifecycle
from app.overrides.models import OverrideState, QueueReleaseStatus
from app.overrides.stuck import attributable, classify_reason, deferred_for, matcher, queue_evidence, queue_line
from app.worker import store
from app.worker.context import JobContext
from app.worker.failures import queue_later
from app.worker.store import QueueAudit, QueueJob

log = logging.getLogger("app.worker.release")

S = QueueReleaseStatus


async def queue_pass(ctx: JobContext, client: MailcowClient, jobs: list[QueueJob]) -> None:
    """Release, check or watch the claimed overrides of one target, on one read of its queue."""
    try:
        queue = QueueView(await client.get_mailq())
    except MailcowError as exc:
        await queue_later(ctx, jobs, "reading the mail queue", exc)
        return
    for job in jobs:
        if job.state == OverrideState.active and job.status is None:
            await _release(ctx, client, job, queue)
        elif job.state == OverrideState.active and job.status == S.released:
            await _check(ctx, job, queue)
        elif job.state in lifecycle.WATCHED_ENDS and job.status != S.watched:
            await _watch(ctx, job, queue)
        else:  # nothing is due for it (a pass left over from before a change): let go
            await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, None, None)


# mailcow lists at most the first 10,000 queued messages: after delivering what it showed, the queue is read
# again (at most this many times) while the list was full and it showed more of the destination's mail.
RELEASE_ROUNDS = 20


async def _release(ctx: JobContext, client: MailcowClient, job: QueueJob, queue: QueueView) -> None:
    size = ctx.settings.queue_release_batch
    mine: list[QueueMessage] = []
    seen: set[str] = set()
    calls = 0
    try:
        for _ in range(RELEASE_ROUNDS):
            new = [m for m in queue.deferred_for(job.destination) if m.queue_id not in seen]
            if new:
                await client.deliver([m.queue_id for m in new], batch_size=size)
                calls += -(-len(new) // size)
                mine += new
                seen.update(m.queue_id for m in new)
            if not new or not queue.capped:
                break
            queue = QueueView(await client.get_mailq())
    except (MailcowError, ValueError) as exc:
        # Messages of earlier batches may have gone out: delivering them again is harmless.
        await queue_later(ctx, [job], f"releasing the deferred mail of override {job.id}", exc)
        return
    ids = [message.queue_id for message in mine]
    now = utcnow()
    evidence = evidence_of(mine, job.destination)
    value = {
        "status": S.released.value,
        "released_at": now.isoformat(),
        "released": len(ids),
        "calls": calls,
        "deferred": evidence,
        "still_stuck": False,
        # mailcow listed its maximum: mail of the destination beyond it was not seen (the check sees what remains).
        "queue_capped": queue.capped,
    }
    check_at = now + timedelta(seconds=ctx.settings.queue_check_seconds)
    comment = (
        f"asked mailcow to deliver the {len(ids)} deferred message(s) for {job.destination} now "
        f"({calls} call(s)); checking at {check_at.isoformat(timespec='seconds')}"
        if ids
        else f"no mail for {job.destination} was deferred; checking at {check_at.isoformat(timespec='seconds')}"
    )
    audit = QueueAudit("override.queue_released", comment, {"released": len(ids), "calls": calls, **evidence})
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, check_at, audit):
        WORKER_JOBS.labels("release", "released").inc()
        log.info("override %s: released %d deferred message(s) for %s", job.id, len(ids), job.destination)


async def _check(ctx: JobContext, job: QueueJob, queue: QueueView) -> None:
    stuck = tls_deferred(queue.deferred_for(job.destination), job.destination)
    now = utcnow()
    evidence = evidence_of(stuck, job.destination)
    value = {**(job.queue_release or {}), "checked_at": now.isoformat(), "still_deferred": evidence}
    if stuck:
        value.update(status=S.still_stuck.value, still_stuck=True)
        audit = QueueAudit(
            "override.still_stuck",
            f"{describe(evidence)} after the release: the override does not let the mail through "
            f"(policy {job.policy}); check the policy against the diagnosis, or revoke it",
            evidence,
        )
    else:
        value.update(status=S.clear.value, still_stuck=False)
        audit = QueueAudit(
            "override.queue_clear", f"no mail for {job.destination} is deferred for TLS any more", evidence
        )
    # The override's queue evidence (what reviewers see) is brought up to date with the same read.
    fresh = replace(queue_evidence(queue.deferred_for(job.destination), job.destination, now), capped=queue.capped)
    fresh_json = fresh.as_json()
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, None, audit, fresh_json):
        WORKER_JOBS.labels("release", "still_stuck" if stuck else "clear").inc()
        if stuck:
            log.warning("override %s: %s after the release", job.id, describe(evidence))


async def _watch(ctx: JobContext, job: QueueJob, queue: QueueView) -> None:
    now = utcnow()
    value: dict[str, Any] = dict(job.queue_release or {})
    if job.status != S.watching:
        until = (job.ended_at or now) + timedelta(seconds=ctx.settings.queue_watch_seconds)
        value.update(status=S.watching.value, watch_until=until.isoformat(), failing=False, episodes=0)
    until = datetime.fromisoformat(str(value["watch_until"]))
    stuck = tls_deferred(queue.deferred_for(job.destination), job.destination)
    audit = None
    if stuck and not value.get("failing"):
        evidence = evidence_of(stuck, job.destination)
        value.update(failing=True, failing_since=now.isoformat(), episodes=int(value.get("episodes", 0)) + 1)
        audit = QueueAudit(
            "recipient.still_failing",
            f"{describe(evidence)} after the override ended ({job.state.value}): the recipient still fails "
            "TLS; request a new override if mail must flow",
            {**evidence, "ended": job.state.value, "request_again": request_again(job)},
        )
    elif not stuck and value.get("failing"):
        value.update(failing=False, failing_since=None)  # the episode is over: a new one is raised again
    due: datetime | None = now + timedelta(seconds=ctx.settings.queue_check_seconds)
    if job.status == S.watching and now >= until:
        value["status"], due = S.watched.value, None
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, due, audit) and audit:
        WORKER_JOBS.labels("release", "still_failing").inc()
        log.warning("override %s ended, but %s", job.id, describe(evidence_of(stuck, job.destination)))


def request_again(job: QueueJob) -> dict[str, Any]:
    """The body of a new request for the same destination (the event's `links.request_again` takes it)."""
    return {"target": job.target, "destination": job.destination, "policy": job.policy}


# ---------------------------------------------------------------------------------------------------------------
# Which queued mail a destination covers, and which delay reasons are TLS's, are app/overrides/stuck.py's rules
# (the queue evidence uses the same); here only what the release adds to them.


class QueueView:
    """One read of a target's queue, its deferred mail indexed by recipient domain: each override of the pass
    looks at its own domains' messages, not at all of the (up to 10,000) messages again."""

    def __init__(self, messages: list[QueueMessage]) -> None:
        self.capped = capped(messages)
        self._by_domain: dict[str, list[QueueMessage]] = defaultdict(list)
        for message in messages:
            if message.deferred:
                for domain in dict.fromkeys(r.domain for r in message.recipients):
                    self._by_domain[domain].append(message)

    def deferred_for(self, destination: str) -> list[QueueMessage]:
        """What `stuck.deferred_for` finds in the whole queue: the deferred messages `destination` covers."""
        covers = matcher(destination)
        if covers is None:
            return []
        found: dict[str, QueueMessage] = {}
        for domain, messages in self._by_domain.items():
            if covers(domain):
                found.update((m.queue_id, m) for m in messages)
        return list(found.values())


def releasable(destination: str) -> bool:
    """Whether queued mail can be told to be the destination's (not a next-hop entry's)."""
    return attributable(destination)


def tls_deferred(messages: list[QueueMessage], destination: str) -> list[QueueMessage]:
    """The deferred messages whose recipients at `destination` wait for a TLS reason (one an override fixes)."""
    covers = matcher(destination)
    if covers is None:
        return []
    return [
        m
        for m in deferred_for(messages, destination)
        if any(covers(r.domain) and _tls(r.delay_reason) for r in m.recipients)
    ]


def _tls(reason: str | None) -> bool:
    rule = classify_reason(reason)
    return rule is not None and rule.tls


def evidence_of(messages: list[QueueMessage], destination: str) -> dict[str, Any]:
    """Counts, the oldest arrival and the distinct delay reasons (classified): never an address or a sender."""
    return queue_evidence(messages, destination, utcnow()).as_json()


def describe(evidence: dict[str, Any]) -> str:
    """E.g. `3 messages to 2 recipients stuck for 1 h: Server certificate not verified`."""
    return queue_line(evidence) or f"no mail deferred for {evidence.get('destination')}"
