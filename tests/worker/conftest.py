"""Fixtures of the worker tests: worker settings (retries due at once: tests step with `tick()`), the
stand-in behind a switch that makes mailcow unreachable, a worker wired to it, worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from app.core.config import Settings
from app.worker.loop import Worker
from tests.worker.helpers import SwitchableTransport, WorkerProcess, assert_chain_valid, worker_settings


@pytest.fixture
def settings() -> Settings:
    return worker_settings()


@pytest.fixture
def chain_stays_valid(engine: Engine) -> Iterator[None]:
    """The audit chain a test leaves behind verifies (modules opt in with `usefixtures`)."""
    yield
    assert_chain_valid(engine)


@pytest.fixture
def transport(standin_app: Starlette) -> SwitchableTransport:
    return SwitchableTransport(standin_app)


@pytest.fixture
async def worker(engine: Engine, settings: Settings, transport: SwitchableTransport) -> AsyncIterator[Worker]:
    worker = Worker(engine, settings, owner="w1", transports={"default": transport})
    yield worker
    await worker.aclose()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        process.stop()
