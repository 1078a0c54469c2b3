"""The queue pass: an active override's deferred mail is released at once, checked a minute later and
with every queue refresh while it lasts, and its destination watched after the override ends.

* release: once an override is active, its destination's deferred messages are handed to mailcow's
  `deliver` (`postqueue -i`, by queue id, in batches of `TLSO_QUEUE_RELEASE_BATCH`; never `flush`, never a
  delete), so mail waiting for Postfix's next retry (up to 30 minutes) flows now: `override.queue_released`
  (none when nothing was deferred). The ids are noted (`releasing`) before each `deliver`, so that a worker
  taking over after a kill asks again and audits the release once; if the override has ended by then, the
  watch audits it (`interrupted`: the end) without asking again.
* check, `TLSO_QUEUE_CHECK_SECONDS` later, then every `TLSO_QUEUE_REFRESH_SECONDS` while active (it is the
  active override's queue refresh): mail for the destination deferred with a TLS reason means the override
  does not help: flagged `still_stuck` (`override.still_stuck`, once per episode, the
  `tlso_overrides_still_stuck` gauge); the flag clears when the mail is gone (`override.queue_clear`). Only a
  change is an event, and the first check's `override.queue_clear` only follows a release that asked for mail.
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
from app.worker.faults import crash_point
from app.worker.store import QueueAudit, QueueJob

log = logging.getLogger("app.worker.release")

S = QueueReleaseStatus
# The statuses of an active override's release whose check is due (the first, and each refresh's after it).
CHECKED = (S.released, S.clear, S.still_stuck)


async def queue_pass(ctx: JobContext, client: MailcowClient, jobs: list[QueueJob]) -> None:
    """Release, check or watch the claimed overrides of one target, on one read of its queue."""
    try:
        queue = QueueView(await client.get_mailq())
    except MailcowError as exc:
        await queue_later(ctx, jobs, "reading the mail queue", exc)
        return
    for job in jobs:
        if job.state == OverrideState.active and job.status in (None, S.releasing):
            await _release(ctx, client, job, queue)
        elif job.state == OverrideState.active and job.status in CHECKED:
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
    # A worker killed after `deliver` and before its record left what it asked for: asking again is harmless
    # (a delivered id is gone, a vanished one answered with success), and the one audit entry counts both.
    before = dict(job.queue_release or {}) if job.status == S.releasing else {}
    asked: list[str] = list(before.get("asking", []))
    calls = int(before.get("calls", 0))
    mine: list[QueueMessage] = []
    seen: set[str] = set()
    try:
        for _ in range(RELEASE_ROUNDS):
            new = [m for m in queue.deferred_for(job.destination) if m.queue_id not in seen]
            if new:
                seen.update(m.queue_id for m in new)
                asked = list(dict.fromkeys([*asked, *(m.queue_id for m in new)]))
                intent = {**before, "status": S.releasing.value, "asking": asked, "calls": calls}
                intent["deferred"] = evidence_of([*mine, *new], job.destination) if not before else before["deferred"]
                if not await ctx.db(store.note_queue_release, ctx.engine, job, ctx.owner, intent):
                    return  # not ours any more (a revoke, a lease run out): the next pass sees to it
                await client.deliver([m.queue_id for m in new], batch_size=size)
                calls += -(-len(new) // size)
                mine += new
            if not new or not queue.capped:
                break
            queue = QueueView(await client.get_mailq())
    except (MailcowError, ValueError) as exc:
        # Messages of earlier batches may have gone out: delivering them again is harmless.
        await queue_later(ctx, [job], f"releasing the deferred mail of override {job.id}", exc)
        return
    if mine:
        crash_point("after_deliver")
    now = utcnow()
    # After a takeover, what this pass still found is only part of it: the reasons asked for before count.
    evidence = before["deferred"] if before and not mine else evidence_of(mine, job.destination)
    value = {
        "status": S.released.value,
        "released_at": now.isoformat(),
        "released": len(asked),
        "calls": calls,
        "deferred": evidence,
        "still_stuck": False,
        # mailcow listed its maximum: mail of the destination beyond it was not seen (the check sees what remains).
        "queue_capped": queue.capped,
    }
    check_at = now + timedelta(seconds=ctx.settings.queue_check_seconds)
    audits = []
    if asked:  # nothing deferred, nothing asked: no event (the check still flags mail that defers later)
        comment = (
            f"asked mailcow to deliver the {len(asked)} deferred message(s) for {job.destination} now "
            f"({calls} call(s)); checking at {check_at.isoformat(timespec='seconds')}"
        )
        after = {"released": len(asked), "calls": calls, **evidence}
        if before:
            after["resumed"] = True  # a worker killed mid-release: this one asked again and records it once
        audits.append(QueueAudit("override.queue_released", comment, after))
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, check_at, audits):
        WORKER_JOBS.labels("release", "released").inc()
        log.info("override %s: released %d deferred message(s) for %s", job.id, len(asked), job.destination)


async def _check(ctx: JobContext, job: QueueJob, queue: QueueView) -> None:
    """Whether the destination's mail still defers for TLS: once after the release, then with every queue
    refresh while the override is active. Only a change is an event: flagged when TLS deferrals appear
    (`override.still_stuck`, once per episode), cleared when they are gone (`override.queue_clear`); the
    release's own check also reports the outcome of a release that asked for something."""
    stuck = tls_deferred(queue.deferred_for(job.destination), job.destination)
    now = utcnow()
    evidence = evidence_of(stuck, job.destination)
    record = dict(job.queue_release or {})
    value = {**record, "checked_at": now.isoformat(), "still_deferred": evidence}
    audit = None
    if stuck:
        value.update(status=S.still_stuck.value, still_stuck=True)
        if job.status != S.still_stuck:
            value["stuck_since"] = now.isoformat()
            audit = QueueAudit(
                "override.still_stuck",
                f"{describe(evidence)} {'after the release' if job.status == S.released else 'again'}: the "
                f"override does not let the mail through (policy {job.policy}); check the policy against the "
                "diagnosis, or revoke it",
                evidence,
            )
    else:
        value.update(status=S.clear.value, still_stuck=False, stuck_since=None)
        if job.status == S.still_stuck or (job.status == S.released and record.get("released")):
            audit = QueueAudit(
                "override.queue_clear", f"no mail for {job.destination} is deferred for TLS any more", evidence
            )
    # The override's queue evidence (what reviewers see) is brought up to date with the same read: for an
    # active override this check is its queue refresh (app/worker/queue_refresh.py leaves it out).
    fresh = replace(queue_evidence(queue.deferred_for(job.destination), job.destination, now), capped=queue.capped)
    refresh = ctx.settings.queue_refresh_seconds
    due = now + timedelta(seconds=refresh) if refresh > 0 else None
    audits = [] if audit is None else [audit]
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, due, audits, fresh.as_json()):
        if audit is not None:
            WORKER_JOBS.labels("release", "still_stuck" if stuck else "clear").inc()
        if audit is not None and stuck:
            log.warning("override %s: %s after the release", job.id, describe(evidence))


async def _watch(ctx: JobContext, job: QueueJob, queue: QueueView) -> None:
    now = utcnow()
    value: dict[str, Any] = dict(job.queue_release or {})
    # A release the end interrupted (its ids noted, mailcow asked or about to be): on record now, not asked again.
    audits = [_interrupted_release(job, value)] if job.status == S.releasing else []
    value.pop("asking", None)  # its ids are no evidence
    if job.status != S.watching:
        until = (job.ended_at or now) + timedelta(seconds=ctx.settings.queue_watch_seconds)
        value.update(status=S.watching.value, watch_until=until.isoformat(), failing=False, episodes=0)
    until = datetime.fromisoformat(str(value["watch_until"]))
    stuck = tls_deferred(queue.deferred_for(job.destination), job.destination)
    failing = bool(stuck) and not value.get("failing")
    if failing:
        evidence = evidence_of(stuck, job.destination)
        value.update(failing=True, failing_since=now.isoformat(), episodes=int(value.get("episodes", 0)) + 1)
        audits.append(
            QueueAudit(
                "recipient.still_failing",
                f"{describe(evidence)} after the override ended ({job.state.value}): the recipient still fails "
                "TLS; request a new override if mail must flow",
                {**evidence, "ended": job.state.value, "request_again": request_again(job)},
            )
        )
    elif not stuck and value.get("failing"):
        value.update(failing=False, failing_since=None)  # the episode is over: a new one is raised again
    due: datetime | None = now + timedelta(seconds=ctx.settings.queue_check_seconds)
    if job.status == S.watching and now >= until:
        value["status"], due = S.watched.value, None
    if await ctx.db(store.move_queue_release, ctx.engine, job, ctx.owner, value, due, audits) and failing:
        WORKER_JOBS.labels("release", "still_failing").inc()
        log.warning("override %s ended, but %s", job.id, describe(evidence_of(stuck, job.destination)))


def _interrupted_release(job: QueueJob, record: dict[str, Any]) -> QueueAudit:
    """`override.queue_released` for a release the override's end cut short: the ids it noted were handed to
    mailcow's `deliver`, or were about to be (a worker killed, or its record refused by the end), so some of
    the mail may have gone out and some not; the watch that follows looks at what is still deferred."""
    asked = list(record.get("asking", []))
    comment = (
        f"the override ended ({job.state.value}) while mailcow was being asked to deliver the {len(asked)} "
        f"deferred message(s) for {job.destination}: some may have gone out; not asked again"
    )
    after = {"released": len(asked), **dict(record.get("deferred") or {}), "interrupted": job.state.value}
    return QueueAudit("override.queue_released", comment, after)


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
