"""Engine, sessions and the one place a request's transaction is committed."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from sqlalchemy import DateTime, Select, event
from sqlalchemy.engine import Engine, Row, make_url
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import TextualSelect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine
from starlette.concurrency import run_in_threadpool


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, hands back aware UTC, on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def compact_json(value: Any) -> str:
    """How JSON columns are written: compact and unescaped, keys in the order given. The audit trail hands
    its rows over with sorted keys, so they are stored in exactly the form it hashes, and a row's stored
    text can be hashed as it is (app/audit/service.py)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def make_engine(url: str, *, pre_ping: bool = True) -> Engine:
    """An engine for `url`. `pre_ping` tests each pooled connection before use (a round trip): the worker
    and the CLI keep it; the API turns it off (see `create_app`). A failed statement's error, and so any
    log line of it, names the statement but none of its values (`hide_parameters`): they are people's
    words (justifications, names, tickets)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=compact_json,
            hide_parameters=True,
        )
        _make_sqlite_serialisable(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    # `pool_recycle` retires connections before idle-timeouts on the way (proxies, firewalls) do.
    return create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=10,
        max_overflow=10,
        pool_recycle=300,
        json_serializer=compact_json,
        hide_parameters=True,
    )


def _make_sqlite_serialisable(engine: Engine) -> None:
    # pysqlite opens deferred transactions, so two writers that both read first can fail with
    # "database is locked" instead of waiting; BEGIN IMMEDIATE makes them queue on the busy timeout.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers (see `reading`) take no write lock: under WAL they see a snapshot and block nobody.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")


_READ_ONLY = "tlso_read_only"


@contextmanager
def reading(engine: Engine) -> Iterator[Session]:
    """A session that only reads (a long export, a chain verification): one consistent snapshot, and
    on SQLite no write lock, so a slow download never holds up the API or the worker."""
    with Session(engine.execution_options(**{_READ_ONLY: True})) as session:
        try:
            yield session
        finally:
            session.rollback()


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work outside a request (worker jobs, CLI): commit on success, else roll back."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _end(session: Session, *, commit: bool) -> None:
    """Commit (or roll back) and close: the end of a request's session, in one hop to the thread pool."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# The request dependencies are `async` generators: opening a Session does no I/O, so it happens on the event
# loop instead of in a hop to the thread pool and back; only the end that talks to the database (COMMIT,
# ROLLBACK) goes to a worker thread, in one call.


async def _request_session(request: Request) -> AsyncIterator[Session]:
    # The single commit point of the API. scope="function" (below) makes FastAPI run the code after
    # `yield` before the response is sent, so a client never sees an answer whose change was lost.
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    except BaseException:
        await _end_request_session(session, commit=False)
        raise
    await _end_request_session(session, commit=True)


async def _end_request_session(session: Session, *, commit: bool) -> None:
    if session.in_transaction():
        await run_in_threadpool(_end, session, commit=commit)
    else:  # never used (a route that wrote through `AsyncReads`, say): nothing to end, no hop to a thread
        session.close()


SessionDep = Annotated[Session, Depends(_request_session, scope="function")]
# The same session and commit point for a route that needs a session on one of its paths only (a yield
# dependency costs every request its machinery, about 40 µs): `async with request_session(request) as
# session:` around the change and its answer, so the commit still comes before the answer is sent.
request_session = asynccontextmanager(_request_session)


def _app_engine(request: Request, name: str, **options: Any) -> Engine:
    """The app's engine with `options`, made once (an OptionEngine per request is not free) and made again
    only if the app's engine was replaced."""
    state = request.app.state
    engine: Engine = state.engine
    made: tuple[Engine, Engine] | None = getattr(state, name, None)
    if made is None or made[0] is not engine:
        made = (engine, engine.execution_options(**options))
        setattr(state, name, made)
    return made[1]


async def _request_reader(request: Request) -> AsyncIterator[Session]:
    # As `reading`: one snapshot, ended by a rollback (a round trip, so in the thread pool) if it began.
    session = Session(_app_engine(request, "tlso_read_engine", **{_READ_ONLY: True}))
    try:
        yield session
    finally:
        await _end_reading(session)


async def _end_reading(session: Session) -> None:
    if session.in_transaction():
        await run_in_threadpool(_end, session, commit=False)
    else:
        session.close()


ReadSessionDep = Annotated[Session, Depends(_request_reader, scope="function")]


def _read_all(engine: Engine, statement: Executable, parameters: dict[str, Any]) -> Sequence[Row[Any]]:
    with engine.connect() as conn:
        return conn.execute(statement, parameters).all()


async def read_rows(request: Request, statement: Select[Any], parameters: dict[str, Any]) -> Sequence[Any]:
    """The rows of one read-only statement, consistent on its own: tuples whose fields are named as the
    statement's columns (`row.id`, `row.vote_at`), with the values SQLAlchemy's Core rows would hold.

    On PostgreSQL it runs on the event loop (`AsyncReads`): no hop to the thread pool and back, no BEGIN and
    no ROLLBACK around it, one round trip. On SQLite (no async driver here) it runs in the thread pool in a
    read-only snapshot, as `reading` does. A lost database is SQLAlchemy's `OperationalError` either way
    (the 503 of app/core/errors.py)."""
    reads = async_statements(request)
    if reads is None:
        reader = _app_engine(request, "tlso_read_engine", **{_READ_ONLY: True})
        return await run_in_threadpool(_read_all, reader, statement, parameters)
    return await reads.rows(statement, parameters)


def async_statements(request: Request) -> AsyncReads | None:
    """The app's `AsyncReads` (made on first use), for statements run on the event loop; None on SQLite."""
    state = request.app.state
    engine: Engine = state.engine
    if is_sqlite(engine):
        return None
    reads: AsyncReads | None = getattr(state, "tlso_async_reads", None)
    if reads is None or reads.engine is not engine or reads.loop is not asyncio.get_running_loop():
        reads = state.tlso_async_reads = AsyncReads(engine)
    return reads


async def close_async_reads(state: Any) -> None:
    """Close the connections of the app's `AsyncReads`, if it has one (at the app's shutdown)."""
    reads: AsyncReads | None = getattr(state, "tlso_async_reads", None)
    state.tlso_async_reads = None
    if reads is not None:
        await reads.close()


_MAX_COMPILED = 4096


def _keeps_none(processor: Callable[[Any], Any]) -> bool:
    try:
        return processor(None) is None
    except Exception:  # a processor that cannot take None is given every value
        return False


@dataclass(frozen=True)
class _Compiled:
    sql: str
    parameters: Callable[[dict[str, Any]], dict[str, Any]]  # every parameter's value, as SQLAlchemy binds it
    binders: Mapping[str, Callable[[Any], Any]]  # the bind processors `parameters` runs, by parameter
    row: type[tuple[Any, ...]]  # a named tuple class: the statement's column names
    # SQLAlchemy's own result processor of the columns that have one, by position, and whether it leaves
    # None as None (then a NULL need not go through it)
    processors: tuple[tuple[int, Callable[[Any], Any], bool], ...]


_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")  # psycopg's pyformat: a named parameter, or an escaped %


@dataclass(frozen=True)
class _Numbered:
    """A statement's text with numbered parameters (`$1` is the first), as the server takes them, and the
    parameters' names in that order. A raw cursor sends it as it is: psycopg does not split it anew on each
    call (it caches that only up to 50 parameters), and it binds the values itself."""

    text: str
    order: tuple[tuple[str, Callable[[Any], Any] | None], ...]  # each parameter's name and bind processor

    @classmethod
    def of(cls, compiled: _Compiled) -> _Numbered:
        numbers: dict[str, int] = {}

        def numbered(match: re.Match[str]) -> str:
            name = match.group(1)
            return "%" if name is None else f"${numbers.setdefault(name, len(numbers) + 1)}"

        text = _PLACEHOLDER.sub(numbered, compiled.sql)
        return cls(text, tuple((name, compiled.binders.get(name)) for name in numbers))

    def values(self, given: dict[str, Any]) -> list[Any]:
        """The values by number, as `_Compiled.parameters` binds them (each statement here names every one)."""
        return [given[name] if binder is None else binder(given[name]) for name, binder in self.order]


class _Pooled:
    """A connection of `AsyncReads` with its cursors, made once (a cursor per statement costs more than the
    statement's own work here; an idle cursor keeps its last result, one page at most, until its next
    statement)."""

    __slots__ = ("born", "conn", "cursor", "writer")

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.cursor = conn.cursor()
        self.writer = psycopg.AsyncRawCursor(conn)
        self.born = time.monotonic()


class AsyncReads:
    """Single statements on PostgreSQL on the event loop: psycopg's `AsyncConnection`s in autocommit
    (each read its own snapshot; a write, `write`, its own transaction), at most `size` at a time, the
    others waiting on the loop.

    A statement is compiled once by SQLAlchemy for this engine's dialect, and each column's value goes
    through the column type's own result processor (UTC datetimes, enums), each parameter through its bind
    processor: the rows hold what SQLAlchemy's rows would, without its execution machinery (which costs
    several times the round trip here). Statements are kept compiled by identity: give it statements made
    once (module constants, or cached per shape as `app.overrides.service.page_query` does).
    Like the engine's pool, a connection error drops every idle connection (they are as dead as the one
    that failed), and a connection is replaced after `recycle` seconds."""

    def __init__(
        self, engine: Engine, size: int = 10, recycle: float = 300.0, wait: float = 30.0, connect_timeout: int = 10
    ) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._size = size
        self._slots = asyncio.Semaphore(size)
        # As the engine's pool: a read waits at most `wait` seconds for a connection (then the pool's
        # TimeoutError, a 503), and a new connection at most `connect_timeout` for the server.
        self._wait = wait
        self._connect_timeout = connect_timeout
        self._idle: list[_Pooled] = []
        self._recycle = recycle
        self._compiled: dict[Select[Any] | TextualSelect, _Compiled] = {}
        self._numbered: dict[str, _Numbered] = {}  # by the compiled statement's text

    def _compile(self, statement: Select[Any] | TextualSelect) -> _Compiled:
        compiled = self._compiled.get(statement)
        if compiled is None:
            dialect = self.engine.dialect
            columns = list(statement.selected_columns)
            done = statement.compile(dialect=dialect)
            binders = {
                name: binder
                for name, bind in done.binds.items()
                if (binder := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
            }

            def parameters(given: dict[str, Any]) -> dict[str, Any]:
                values = done.construct_params(given)
                return {k: binders[k](v) if k in binders else v for k, v in values.items()}

            compiled = _Compiled(
                sql=str(done),
                parameters=parameters,
                binders=binders,
                row=namedtuple("Row", statement.selected_columns.keys()),
                processors=tuple(
                    (i, processor, _keeps_none(processor))
                    for i, c in enumerate(columns)
                    if (processor := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
                ),
            )
            if len(self._compiled) >= _MAX_COMPILED:  # a caller making statements anew would grow it forever
                self._compiled.clear()
            self._compiled[statement] = compiled
        return compiled

    async def rows(self, statement: Select[Any], parameters: dict[str, Any]) -> list[Any]:
        compiled = self._compile(statement)
        return self._made(compiled, await self._run(compiled, compiled.parameters(parameters)))

    async def write(self, statement: Select[Any] | TextualSelect, parameters: dict[str, Any]) -> list[Any]:
        """The rows of one statement that writes, in one round trip: in autocommit, the statement is a
        transaction of its own, committed (its WAL flushed) before its answer comes back. So the statement
        must refuse in itself, by raising, whatever must not be stored: nothing is looked at between it and
        the COMMIT (nor held, its locks included, while this side's event loop gets back to it).

        The statement is prepared once per connection by psycopg (`prepare=True`: parsed and planned once,
        then only bound and executed; psycopg prepares it again on a connection that lost it to `DEALLOCATE
        ALL` or `DISCARD ALL`), its values bound by psycopg's own dumpers."""
        compiled = self._compile(statement)
        numbered = self._numbered.get(compiled.sql)
        if numbered is None:
            numbered = self._numbered[compiled.sql] = _Numbered.of(compiled)

        async def at_once(pooled: _Pooled, given: dict[str, Any]) -> list[Any]:
            writer = pooled.writer
            await writer.execute(numbered.text, numbered.values(given), prepare=True)
            return await writer.fetchall()

        return self._made(compiled, await self._run(compiled, parameters, at_once))

    async def _run(
        self,
        compiled: _Compiled,
        parameters: dict[str, Any],
        execute: Callable[[_Pooled, dict[str, Any]], Awaitable[list[Any]]] | None = None,
    ) -> list[Any]:
        """The statement's raw rows, on a connection of the pool (`execute`: how it is run, else on its own)."""
        if self._slots.locked():  # every connection busy: wait for one, at most `wait` seconds
            try:
                async with asyncio.timeout(self._wait):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout(f"no database connection free after {self._wait:g} s ({self._size} in use)") from None
        else:
            await self._slots.acquire()  # free: taken at once, no timer to set and cancel
        try:
            pooled = await self._checkout(compiled, parameters)
            conn = pooled.conn
            try:
                if execute is None:
                    await pooled.cursor.execute(compiled.sql, parameters)
                    fetched = await pooled.cursor.fetchall()
                else:
                    fetched = await execute(pooled, parameters)
            except psycopg.Error as exc:
                # A lost connection: like the engine's pool, drop every idle one too (they are as dead).
                invalidated = conn.broken or isinstance(exc, psycopg.OperationalError)
                if invalidated or isinstance(exc, psycopg.errors.InvalidSqlStatementName):
                    # Or one whose prepared statements went behind psycopg's back (a pooler, DISCARD ALL through
                    # another path): psycopg would name the one it thinks it has again, and fail again.
                    await conn.close()
                    if invalidated:
                        await self.close()
                else:
                    self._idle.append(pooled)
                raise self._error(exc, compiled, parameters, invalidated=invalidated) from exc
            except BaseException:  # cancelled mid-statement, or else: the connection's state is unknown, not reused
                await conn.close()
                raise
            self._idle.append(pooled)
        finally:
            self._slots.release()
        return fetched

    @staticmethod
    def _made(compiled: _Compiled, fetched: list[Any]) -> list[Any]:
        make, processors = compiled.row, compiled.processors
        if not processors or not fetched:
            return [make(*raw) for raw in fetched]
        if len(fetched) == 1:  # one row (an override read or written): value by value
            row = list(fetched[0])
            for i, processor, keeps_none in processors:
                if (value := row[i]) is not None or not keeps_none:
                    row[i] = processor(value)
            return [make(*row)]
        # Column by column (a page is tens of rows of tens of columns): each processor over its column in one
        # comprehension, then the rows made from the columns in one pass.
        columns: list[Sequence[Any]] = list(zip(*fetched, strict=True))
        for i, processor, keeps_none in processors:
            columns[i] = [value if value is None and keeps_none else processor(value) for value in columns[i]]
        return list(map(make, *columns))

    async def _checkout(self, compiled: _Compiled, parameters: dict[str, Any]) -> _Pooled:
        while self._idle:
            pooled = self._idle.pop()
            if not pooled.conn.closed and time.monotonic() - pooled.born < self._recycle:
                return pooled
            await pooled.conn.close()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
            )
            return _Pooled(conn)
        except psycopg.Error as exc:
            raise self._error(exc, compiled, parameters, invalidated=False) from exc

    @staticmethod
    def _error(
        exc: psycopg.Error, compiled: _Compiled, parameters: dict[str, Any], *, invalidated: bool
    ) -> StatementError:
        """The exception SQLAlchemy raises for `exc` (OperationalError, ProgrammingError, ...), without the
        statement's values, as the engine's (`make_engine`)."""
        return DBAPIError.instance(
            compiled.sql, parameters, exc, psycopg.Error, hide_parameters=True, connection_invalidated=invalidated
        )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for pooled in idle:
            await pooled.conn.close()
