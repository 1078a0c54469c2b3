"""What every job needs: the database, the settings, this worker's name, and the failure policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from sqlalchemy import Engine

from app.core.config import Settings
from app.core.metrics import WORKER_JOBS
from app.mailcow.client import MailcowAuthError, MailcowClient, MailcowError
from app.mailcow.policy_map import PolicyMap
from app.mailcow.targets import Target
from app.targets.service import pause_target
from app.worker import store
from app.worker.store import Job

log = logging.getLogger("app.worker")

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class JobContext:
    engine: Engine
    settings: Settings
    owner: str
    targets: dict[str, Target] = field(default_factory=dict)
    # Targets that answered 401/403 during this tick: nobody calls them again until the pause ends.
    auth_failed: set[str] = field(default_factory=set)

    async def db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a (blocking) database function off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def gather(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        """Run mailcow-bound calls with at most `worker_concurrency` in flight."""
        limit = asyncio.Semaphore(self.settings.worker_concurrency)

        async def bounded(call: Awaitable[T]) -> T:
            async with limit:
                return await call

        return list(await asyncio.gather(*(bounded(call) for call in calls)))

    async def read_map(self, client: MailcowClient, jobs: list[Job], job_kind: str) -> PolicyMap | None:
        """The target's TLS policy map now; if mailcow cannot say, every job is retried later (None)."""
        try:
            return PolicyMap(await client.list_policies())
        except MailcowError as exc:
            for job in jobs:
                await self.retry_later(job, job_kind, exc)
            return None

    async def retry_later(
        self, job: Job, job_kind: str, error: BaseException | str, delay: float | None = None
    ) -> None:
        """The attempt failed and will be retried: back off; after an authentication failure the target's
        pause holds the job back instead, so that it runs the moment the pause ends (timer, corrected key,
        resume) and never waits longer than the pause."""
        text = error if isinstance(error, str) else describe(error)
        if isinstance(error, MailcowAuthError):
            delay = 0.0
            await self.pause(job.target, text)
        wait = await self.db(store.release, self.engine, self.settings, job, self.owner, text, delay)
        WORKER_JOBS.labels(job_kind, "retry").inc()
        when = "when the target's pause ends" if job.target in self.auth_failed else f"in {wait:.1f}s"
        log.warning("%s of override %s on %s failed (%s); next attempt %s", job_kind, job.id, job.target, text, when)

    async def pause(self, target: str, reason: str) -> None:
        config = self.targets.get(target)
        if target in self.auth_failed or config is None:
            return
        self.auth_failed.add(target)
        seconds = self.settings.mailcow_auth_backoff_seconds
        await self.db(pause_target, self.engine, config, seconds, reason)
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


def describe(error: BaseException) -> str:
    if isinstance(error, MailcowError):
        return f"{error.kind}: {error.message}"
    return f"{type(error).__name__}: {error}"
