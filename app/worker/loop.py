"""The worker loop: find what is due, run the jobs, sleep until the next due time.

One iteration ("tick"): lapse undecided requests, start the removal of expired overrides, claim and
run removals and applies (per target, targets in parallel), release, check and watch the queue of
overrides whose queue pass is due, reconcile the targets whose turn it is, refresh the mail queue
evidence of watched overrides, deliver notifications. Then it sleeps until the earliest due time in the
database — an expiry, a retry, a lease running out, a queue pass, a reconcile — but never longer than
`TLSO_WORKER_POLL_SECONDS`, because approvals happen in the API process and are only seen by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from app.audit.checkpoints import audit_upkeep
from app.audit.signing import signer_from
from app.core.config import Settings
from app.core.db import utcnow
from app.core.metrics import WORKER_LAG, WORKER_LAST_LOOP
from app.mailcow.client import MailcowClient
from app.mailcow.targets import Target, TargetNotConfigured, configured_targets
from app.notify.service import deliver
from app.notify.sinks import sinks_from
from app.overrides.models import OverrideState
from app.targets.service import claim_reconcile, ensure_targets, renew_reconcile, running_pauses
from app.worker import store
from app.worker.apply import apply_batch
from app.worker.context import JobContext
from app.worker.failures import queue_later, retry_later
from app.worker.faults import CRASH_ENV
from app.worker.queue_refresh import refresh_queues
from app.worker.recheck import watch
from app.worker.reconcile import reconcile_target
from app.worker.release import queue_pass
from app.worker.remove import remove_batch
from app.worker.store import Job, QueueJob

log = logging.getLogger("app.worker")


def default_owner() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class TickResult:
    did_work: bool
    next_due: datetime | None


class Worker:
    """One worker process's loop; `tick()` is one iteration (the tests drive it directly)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        owner: str | None = None,
        transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.owner = owner or settings.worker_id or default_owner()
        self.targets: dict[str, Target] = configured_targets(settings)
        self.ctx = JobContext(engine, settings, self.owner, self.targets)
        self.signer = signer_from(settings)  # signs audit checkpoints; None: none are made (not in production)
        self._transports = transports or {}
        self._clients: dict[str, MailcowClient] = {}
        self._http: httpx.AsyncClient | None = None
        self._targets_known = False
        self._pauses_seen: set[tuple[str, datetime]] = set()  # pauses for another key, logged once

    def client(self, target: str) -> MailcowClient:
        if target not in self._clients:
            config = self.targets.get(target)
            if config is None:
                raise TargetNotConfigured(f"mailcow target {target!r} has no URL or API key configured")
            self._clients[target] = config.client(self.settings, transport=self._transports.get(target))
        return self._clients[target]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- one iteration ------------------------------------------------------------------------------

    async def tick(self) -> TickResult:
        ctx, settings = self.ctx, self.settings
        ctx.auth_failed.clear()
        if not self._targets_known:
            with contextlib.suppress(IntegrityError):  # another worker created the rows at the same time
                await ctx.db(ensure_targets, self.engine, list(self.targets))
            self._targets_known = True
        batch, lease = settings.worker_batch_size, settings.worker_lease_seconds
        paused = set(await ctx.db(self._paused))
        lapsed = await ctx.db(store.lapse_due, self.engine, batch)
        late = await ctx.db(store.expire_due, self.engine, settings, batch)
        removals = await ctx.db(
            store.claim,
            self.engine,
            OverrideState.removing,
            self.owner,
            lease_seconds=lease,
            limit=batch,
            exclude_targets=paused,
        )
        applies = await ctx.db(
            store.claim,
            self.engine,
            OverrideState.approved,
            self.owner,
            lease_seconds=lease,
            limit=batch,
            exclude_targets=paused,
        )
        now = utcnow()
        lags = late + [(now - job.due_at).total_seconds() for job in removals + applies if job.due_at is not None]
        WORKER_LAG.set(max([0.0, *lags]))

        work: dict[str, tuple[list[Job], list[Job]]] = defaultdict(lambda: ([], []))
        for job in removals:
            work[job.target][0].append(job)
        for job in applies:
            work[job.target][1].append(job)
        claimed = [job.id for job in removals + applies]
        async with self._renewing(store.renew, claimed, lease):
            # Every target's jobs run to their end even if one target's fail (their leases are renewed
            # meanwhile); the first failure is raised afterwards.
            outcomes = await asyncio.gather(
                *(self._run_target(name, rem, app) for name, (rem, app) in work.items()), return_exceptions=True
            )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failures[1:]:
            log.error("worker jobs failed as well: %r", failure)
        if failures:
            raise failures[0]

        released = await self._queue_pass(paused)

        reconcilable = [name for name in self.targets if name not in paused and name not in ctx.auth_failed]
        reconciling = await ctx.db(claim_reconcile, self.engine, reconcilable, self.owner, timedelta(seconds=lease))
        async with self._renewing(renew_reconcile, reconciling, timedelta(seconds=lease)):
            for name in reconciling:
                await reconcile_target(ctx, self.client(name), name)

        queues = [name for name in self.targets if name not in paused and name not in ctx.auth_failed]
        refreshed = await refresh_queues(ctx, self.client, queues)

        await ctx.db(audit_upkeep, self.engine, settings, self.signer)  # before delivery: checkpoints go out now
        delivered = await self._deliver()
        next_due = await ctx.db(store.next_due, self.engine, list(self.targets), paused | ctx.auth_failed)
        did_work = bool(lapsed or late or removals or applies or released or reconciling or refreshed or delivered)
        return TickResult(did_work, next_due)

    @contextlib.asynccontextmanager
    async def _renewing(
        self, renew: Callable[[Engine, list[Any], str, Any], object], keys: list[Any], lease: Any
    ) -> AsyncIterator[None]:
        """While the body runs, renew this worker's leases on `keys` every third of a lease, so that a
        slow mailcow does not let another worker take the same jobs (or target) over mid-call."""
        period = self.settings.worker_lease_seconds / 3

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(period)
                try:
                    await self.ctx.db(renew, self.engine, keys, self.owner, lease)
                except Exception as exc:  # the database is away: the lease may lapse, the record checks it
                    log.warning("renewing %d leases failed: %s", len(keys), exc)

        task = asyncio.create_task(heartbeat()) if keys else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _queue_pass(self, paused: set[str]) -> int:
        """Release the deferred mail of overrides that just became active, check it, watch ended ones
        (app/worker/release.py); after the applies, so that an override's mail flows in the pass that applied it."""
        ctx, settings = self.ctx, self.settings
        jobs = await ctx.db(
            store.claim_queue,
            self.engine,
            self.owner,
            lease_seconds=settings.worker_lease_seconds,
            limit=settings.worker_batch_size,
            exclude_targets=paused | ctx.auth_failed,
        )
        by_target: dict[str, list[QueueJob]] = defaultdict(list)
        for job in jobs:
            by_target[job.target].append(job)

        async def one_target(target: str, target_jobs: list[QueueJob]) -> None:
            try:
                client = self.client(target)
            except TargetNotConfigured as exc:
                await queue_later(ctx, target_jobs, "the queue pass", exc)
                return
            await queue_pass(ctx, client, target_jobs)

        async with self._renewing(store.renew_queue, [job.id for job in jobs], settings.worker_lease_seconds):
            outcomes = await asyncio.gather(
                *(one_target(name, target_jobs) for name, target_jobs in by_target.items()), return_exceptions=True
            )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]
        return len(jobs)

    def _paused(self) -> list[str]:
        """The targets paused for the key configured here."""
        with Session(self.engine) as session:
            pauses = running_pauses(session, self.targets)
        for pause in pauses:
            if not pause.applies and (pause.target, pause.until) not in self._pauses_seen:
                self._pauses_seen.add((pause.target, pause.until))
                log.warning(
                    "mailcow target %s: calls are paused until %s for an API key mailcow refused (%s); the key "
                    "configured here is another one, so calls go on, waiting jobs first",
                    pause.target,
                    pause.until.isoformat(),
                    pause.reason,
                )
        return [pause.target for pause in pauses if pause.applies]

    async def _run_target(self, target: str, removals: list[Job], applies: list[Job]) -> None:
        try:
            client = self.client(target)
        except TargetNotConfigured as exc:
            for job in removals + applies:
                await retry_later(self.ctx, job, "remove" if job.state == OverrideState.removing else "apply", str(exc))
            return
        if removals:
            await remove_batch(self.ctx, client, removals)
        if applies:
            if target in self.ctx.auth_failed:
                for job in applies:  # due again as soon as the target's pause ends
                    await retry_later(self.ctx, job, "apply", "not tried: the target rejected our API key", 0.0)
            else:
                await apply_batch(self.ctx, client, applies)

    async def _deliver(self) -> int:
        if not sinks_from(self.settings):
            return 0
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        return await deliver(self.engine, self.settings, self._http, self.owner)

    # ---- the loop -----------------------------------------------------------------------------------

    def _delay(self, result: TickResult) -> float:
        poll = self.settings.worker_poll_seconds
        if result.next_due is None:
            return poll
        seconds = (result.next_due - utcnow()).total_seconds()
        if seconds <= 0:
            # Due but not claimable (another worker holds it): look again soon, without spinning.
            return 0.0 if result.did_work else min(poll, 0.2)
        return min(seconds, poll)

    async def run(self, stop: asyncio.Event) -> None:
        """Loop until `stop` is set; database and mailcow outages are waited out, never fatal."""
        watcher = None
        if self.settings.remediation != "off":
            watcher = asyncio.create_task(watch(self.engine, self.settings, stop), name="remediation-watch")
        try:
            await self._loop(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                delay = self._delay(await self.tick())
                failures = 0
            except Exception:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.exception("worker iteration failed (%d in a row); next try in %.1fs", failures, delay)
            WORKER_LAST_LOOP.set(time.time())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


def run_worker(engine: Engine, settings: Settings) -> None:
    """`python -m app worker`: run until SIGTERM/SIGINT, finishing the current iteration first."""
    if os.environ.get(CRASH_ENV) and settings.env == "production":
        raise SystemExit(f"worker: {CRASH_ENV} is a test hook; it is refused with TLSO_ENV=production")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(engine, settings, stop)

    asyncio.run(main())


async def serve(engine: Engine, settings: Settings, stop: asyncio.Event) -> None:
    """One worker from start to `stop` (its own process, or a thread of dev mode)."""
    worker = Worker(engine, settings)
    targets = ", ".join(f"{t.name}={t.url}" for t in worker.targets.values()) or "none configured"
    log.info("worker %s started; targets: %s; poll %.1fs", worker.owner, targets, settings.worker_poll_seconds)
    if not worker.targets:
        log.warning("no mailcow target is configured (TLSO_MAILCOW_URL + key, TLSO_MAILCOW_TARGETS): nothing applies")
    if worker.signer is None:
        log.warning("no audit signing key (TLSO_AUDIT_SIGNING_KEY_FILE): the audit trail gets no signed checkpoints")
    if os.environ.get(CRASH_ENV):
        log.warning("fault injection is armed: %s=%s", CRASH_ENV, os.environ[CRASH_ENV])
    try:
        await worker.run(stop)
    finally:
        await worker.aclose()
        log.info("worker %s stopped", worker.owner)
