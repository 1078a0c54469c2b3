"""The worker's refresh of the mail queue evidence: for each target with pending, approved or active
overrides whose evidence is older than `TLSO_QUEUE_REFRESH_SECONDS` (or missing: a request taken from
Slack, or with the read on create turned off), read the queue once and store what it says about each of
their destinations (app.overrides.stuck). A read that fails is recorded as such on each override, so
that it is not retried before the next interval; a refused key pauses the target like any other call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta

from app.core.db import utcnow
from app.mailcow.client import MailcowClient
from app.mailcow.errors import MailcowError
from app.mailcow.targets import TargetNotConfigured
from app.overrides.stuck import queue_error, queue_evidence
from app.targets.queue import WATCHED_STATES, describe_failure, watched
from app.worker import store
from app.worker.context import JobContext
from app.worker.failures import pause_if_refused

log = logging.getLogger("app.worker")


async def refresh_queues(ctx: JobContext, client_of: Callable[[str], MailcowClient], targets: Iterable[str]) -> int:
    """Refresh the queue evidence of the overrides that need it on `targets`; how many were written."""
    interval = ctx.settings.queue_refresh_seconds
    if interval <= 0:
        return 0
    written = 0
    for target in targets:
        stale = await ctx.db(watched, ctx.engine, target, utcnow() - timedelta(seconds=interval))
        if not stale or target in ctx.auth_failed:
            continue
        try:
            messages = await client_of(target).get_mailq()
        except (MailcowError, TargetNotConfigured) as exc:
            await pause_if_refused(ctx, target, exc)
            error = describe_failure(exc)
            log.warning("reading the mail queue of %s failed: %s", target, error)
            now = utcnow()
            evidence = {override_id: queue_error(dest, now, error).as_json() for override_id, dest in stale}
        else:
            now = utcnow()
            evidence = {override_id: queue_evidence(messages, dest, now).as_json() for override_id, dest in stale}
        written += await ctx.db(store.record_queue_evidence, ctx.engine, evidence, WATCHED_STATES)
    return written
