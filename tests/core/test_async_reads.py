"""`AsyncReads` (app/core/db.py), the event-loop reads of the hot routes on PostgreSQL: a read that finds every
connection busy waits as long as the engine's pool would and then fails as the pool does (the 503 of
app/core/errors.py), and a slot is given back whatever happened to its read."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.core.db import AsyncReads

pytestmark = pytest.mark.parametrize("backend", ["postgres"])

SLEEP = sa.select(sa.func.pg_sleep(sa.bindparam("seconds", type_=sa.Float)).label("slept"))
ONE = sa.select(sa.literal(1, sa.Integer).label("one"))
FAILS = sa.select(sa.cast(sa.bindparam("text", type_=sa.String), sa.Integer).label("never"))


async def test_a_read_that_finds_every_connection_busy_times_out_as_the_pool_does(engine: Engine) -> None:
    reads = AsyncReads(engine, size=1, wait=0.3)
    try:
        busy = asyncio.create_task(reads.rows(SLEEP, {"seconds": 1.5}))
        await asyncio.sleep(0.2)  # the slow read holds the only connection
        with pytest.raises(PoolTimeout):
            await reads.rows(ONE, {})
        await busy
        assert [row.one for row in await reads.rows(ONE, {})] == [1]  # the slot came back
    finally:
        await reads.close()


async def test_a_slot_is_given_back_after_a_failed_and_a_cancelled_read(engine: Engine) -> None:
    reads = AsyncReads(engine, size=1, wait=0.5)
    try:
        with pytest.raises(sa.exc.DataError):
            await reads.rows(FAILS, {"text": "not a number"})
        slow = asyncio.create_task(reads.rows(SLEEP, {"seconds": 5}))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert [row.one for row in await reads.rows(ONE, {})] == [1]
    finally:
        await reads.close()


async def test_an_unreachable_server_is_an_operational_error(engine: Engine) -> None:
    gone = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none")  # nothing listens on port 9
    reads = AsyncReads(gone, size=1, wait=0.5, connect_timeout=2)
    try:
        with pytest.raises(OperationalError):
            await reads.rows(ONE, {})
    finally:
        await reads.close()
        gone.dispose()


async def test_a_failed_statement_names_none_of_its_values(engine: Engine) -> None:
    """As the engine's errors (tests/core/test_errors.py): the statement, none of its values."""
    words = "the recipient's admin, Jane Roe, said so on the phone"
    missing = sa.select(sa.literal_column("words")).select_from(sa.table("no_such_table"))
    statement = missing.where(sa.literal_column("words") == sa.bindparam("words", type_=sa.String))
    reads = AsyncReads(engine, size=1)
    try:
        for run in (reads.rows, reads.write):
            with pytest.raises(sa.exc.ProgrammingError) as failed:
                await run(statement, {"words": words})
            assert "no_such_table" in str(failed.value) and words not in str(failed.value), failed.value
    finally:
        await reads.close()
