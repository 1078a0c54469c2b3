"""Engine, sessions and the one place a request's transaction is committed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import DateTime, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine


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
    and the CLI keep it; the API turns it off (see `create_app`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_serializer=compact_json
        )
        _make_sqlite_serialisable(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    # `pool_recycle` retires connections before idle-timeouts on the way (proxies, firewalls) do.
    return create_engine(
        url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=10, pool_recycle=300, json_serializer=compact_json
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


def _request_session(request: Request) -> Iterator[Session]:
    # The single commit point of the API. scope="function" (below) makes FastAPI run the code after
    # `yield` before the response is sent, so a client never sees an answer whose change was lost.
    with transaction(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(_request_session, scope="function")]


def _request_reader(request: Request) -> Iterator[Session]:
    with reading(request.app.state.engine) as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(_request_reader, scope="function")]


def _request_statement(request: Request) -> Iterator[Session]:
    engine: Engine = request.app.state.engine
    if is_sqlite(engine):
        yield from _request_reader(request)
        return
    # On PostgreSQL a lone statement is its own snapshot: no BEGIN and no ROLLBACK round trip around it.
    with Session(engine.execution_options(isolation_level="AUTOCOMMIT")) as session:
        yield session


StatementSessionDep = Annotated[Session, Depends(_request_statement, scope="function")]
"""For a read that is one statement (one override and its votes): consistent without a transaction."""
