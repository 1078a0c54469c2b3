"""What happens when mailcow says no: every failed call is sorted here into retry later, a permanent
failure, or a pause of the target — for apply, remove, reconcile and restore alike — and the retry and
the pause are made here.

* pause: mailcow refused our API key (401/403, or an add that did not arrive as admin). mailcow bans an
  IP after 10 failed logins in 10 minutes, so nobody calls the target with that key until the pause
  ends (`TLSO_MAILCOW_AUTH_BACKOFF_SECONDS`, a corrected key, or an admin's resume); the job stays due
  and runs the moment it does.
* fail: mailcow (or the client's own checks, before anything is sent) will say the same again. What
  giving up means is the job's: an apply fails, a restore is noted as not done and the removal goes on.
  Reading the map, deleting our rows and repairing drift are never given up.
* retry: anything else (unreachable, 5xx, an empty answer, a rejection that may be configuration
  trouble): the job is due again after an exponential backoff.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from app.core.metrics import WORKER_JOBS
from app.mailcow.client import MailcowClient
from app.mailcow.errors import MailcowAuthError, MailcowError, MailcowProtocolError, MailcowRejected
from app.mailcow.policy_map import PolicyMap
from app.targets.service import pause_target
from app.worker import store
from app.worker.context import JobContext
from app.worker.store import Job

log = logging.getLogger("app.worker")

# mailcow refuses these deterministically: retrying cannot help.
PERMANENT_REJECTIONS = frozenset({"tls_policy_map_dest_invalid", "tls_policy_map_parameter_invalid"})


class Verdict(StrEnum):
    retry = "retry"
    fail = "fail"
    pause = "pause"


class Call(StrEnum):
    """What a failed call was for: how much of mailcow's "no" is final depends on it."""

    add = "add"  # an override's row: a known permanent rejection at once, other rejections after a few attempts
    restore = "restore"  # a replaced foreign row put back: any rejection is final (mailcow's add refuses
    # some dests that its edit form accepted), so that the removal is never held up by it
    upkeep = "upkeep"  # reading the map, deleting our rows, repairing drift: never given up


def verdict(error: BaseException, call: Call, *, attempts: int = 1, max_attempts: int = 1) -> Verdict:
    """Retry later, fail for good, or pause the target, for `error` on the `attempts`-th try of `call`."""
    if isinstance(error, MailcowAuthError):
        return Verdict.pause
    if call is Call.upkeep:
        return Verdict.retry
    if isinstance(error, ValueError):  # refused by the client before anything was sent
        return Verdict.fail
    if isinstance(error, MailcowRejected) and (call is Call.restore or error.msg_key in PERMANENT_REJECTIONS):
        return Verdict.fail
    persistent = isinstance(error, MailcowRejected | MailcowProtocolError)  # configuration trouble, perhaps
    if call is Call.add and persistent and attempts >= max_attempts:
        return Verdict.fail
    return Verdict.retry


def describe(error: BaseException) -> str:
    if isinstance(error, MailcowError):
        return f"{error.kind}: {error.message}"
    return f"{type(error).__name__}: {error}"


async def retry_later(
    ctx: JobContext, job: Job, job_kind: str, error: BaseException | str, delay: float | None = None
) -> None:
    """The attempt failed and will be retried: back off; after an authentication failure the target's
    pause holds the job back instead, so that it runs the moment the pause ends (timer, corrected key,
    resume) and never waits longer than the pause."""
    text = error if isinstance(error, str) else describe(error)
    if not isinstance(error, str) and await pause_if_refused(ctx, job.target, error):
        delay = 0.0
    wait = await ctx.db(store.release, ctx.engine, ctx.settings, job, ctx.owner, text, delay)
    WORKER_JOBS.labels(job_kind, "retry").inc()
    when = "when the target's pause ends" if job.target in ctx.auth_failed else f"in {wait:.1f}s"
    log.warning("%s of override %s on %s failed (%s); next attempt %s", job_kind, job.id, job.target, text, when)


async def queue_later(ctx: JobContext, jobs: list[store.QueueJob], what: str, error: BaseException) -> None:
    """A queue read or `deliver` failed (the release, its check, the watch): never given up. After a refused
    key the target pauses and the passes wait for it; otherwise they are due again after
    `TLSO_QUEUE_CHECK_SECONDS` (at least the first retry's backoff): mailcow's queue tools run in its
    `dockerapi` container, which does not come back within seconds."""
    paused = await pause_if_refused(ctx, jobs[0].target, error) if jobs else False
    delay = 0.0 if paused else max(ctx.settings.retry_initial_seconds, ctx.settings.queue_check_seconds)
    for job in jobs:
        await ctx.db(store.queue_later, ctx.engine, job, ctx.owner, delay)
        WORKER_JOBS.labels("release", "retry").inc()
    when = "when the target's pause ends" if paused else f"in {delay:.1f}s"
    log.warning(
        "%s on %s failed (%s); %d override(s) try again %s",
        what,
        jobs[0].target if jobs else "?",
        describe(error),
        len(jobs),
        when,
    )


async def given_up(
    ctx: JobContext, job: Job, job_kind: str, error: BaseException, call: Call, *, attempts: int = 1
) -> bool:
    """Act on a failed call for `job`: retry it later (pausing the target if it refused our key), or, when
    its verdict is a permanent failure, return True: the caller records what giving up means for it."""
    if verdict(error, call, attempts=attempts, max_attempts=ctx.settings.apply_max_attempts) is Verdict.fail:
        return True
    await retry_later(ctx, job, job_kind, error)
    return False


async def read_map(ctx: JobContext, client: MailcowClient, jobs: list[Job], job_kind: str) -> PolicyMap | None:
    """The target's TLS policy map now; if mailcow cannot say, every job is retried later (None)."""
    try:
        return PolicyMap(await client.list_policies())
    except MailcowError as exc:
        for job in jobs:
            await retry_later(ctx, job, job_kind, exc)
        return None


async def pause_if_refused(ctx: JobContext, target: str, error: BaseException) -> bool:
    """Pause `target` if `error` says it refused our key (a reconcile or a drift repair, which no job
    retries, asks this alone); whether it did."""
    if verdict(error, Call.upkeep) is not Verdict.pause:
        return False
    await pause(ctx, target, describe(error))
    return True


async def pause(ctx: JobContext, target: str, reason: str) -> None:
    """mailcow refused our key: no calls to `target` with it until the pause ends (once per tick)."""
    config = ctx.targets.get(target)
    if target in ctx.auth_failed or config is None:
        return
    ctx.auth_failed.add(target)
    seconds = ctx.settings.mailcow_auth_backoff_seconds
    await ctx.db(pause_target, ctx.engine, config, seconds, reason)
    log.error(
        "mailcow target %s rejected our API key (%s): no calls to it with this key for %.0fs; check "
        "TLSO_MAILCOW_API_KEY and the key's allowed IPs (mailcow bans an IP after 10 failed logins in 10 "
        "minutes). A corrected key ends the pause when the worker restarts; an admin can end it now "
        "(POST /v1/targets/%s/resume)",
        target,
        reason,
        seconds,
        target,
    )
