"""What every job needs: the database, the settings, this worker's name, the targets and which of them
refused our key during this tick."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from sqlalchemy import Engine

from app.core.config import Settings
from app.mailcow.targets import Target

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
