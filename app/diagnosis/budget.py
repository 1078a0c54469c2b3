"""The diagnosis budget and the recent diagnoses, kept in the database so that every API replica shares
them: N replicas enforce one `TLSO_DIAGNOSIS_RATE_PER_MINUTE` per caller, and a burst of requests for one
broken domain probes it once whichever replica takes each request.

Both are plain rows (PostgreSQL in production, the SQLite file when embedded). A caller's check is one
short transaction of its own, serialised per caller (PostgreSQL: a transaction-scoped advisory lock on
the caller; SQLite: its single writer), so two replicas cannot both take the last call of a window. Times
are the replicas' own clocks (UTC); keep them in step (NTP), as the tokens' `exp` already requires.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, Engine, Index, delete, func, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, col, select

from app.core.db import UTCDateTime, is_sqlite, reading, transaction, utcnow
from app.core.errors import TooManyRequests
from app.diagnosis.models import Diagnosis


class DiagnosisCall(SQLModel, table=True):
    """One diagnosis a caller started, kept for the rate limit's window."""

    __tablename__ = "diagnosis_call"
    __table_args__ = (Index("ix_diagnosis_call_caller_at", "caller", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    caller: str = Field(max_length=300)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))


class RecentDiagnosis(SQLModel, table=True):
    """The latest diagnosis of a domain, reused while it is recent."""

    __tablename__ = "recent_diagnosis"

    domain: str = Field(primary_key=True, max_length=300)
    checked_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    diagnosis: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


def _lock_key(caller: str) -> int:
    """A signed 64-bit advisory-lock key for the caller (PostgreSQL)."""
    return int.from_bytes(hashlib.sha256(b"tlso-diagnosis-budget\0" + caller.encode()).digest()[:8], "big", signed=True)


class RateLimiter:
    """At most `per_minute` diagnoses per caller in any 60 s window, across every process of the service."""

    WINDOW = 60.0

    def __init__(self, engine: Engine, per_minute: int) -> None:
        self.engine = engine
        self.per_minute = per_minute
        self._next_sweep = 0.0

    def check(self, caller: str) -> None:
        """Take one call from the caller's budget, or raise TooManyRequests (with Retry-After)."""
        now = utcnow()
        window_start = now - timedelta(seconds=self.WINDOW)
        with transaction(self.engine) as session:
            if not is_sqlite(self.engine):  # SQLite: BEGIN IMMEDIATE already made this the only writer
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(caller)})
            session.execute(
                delete(DiagnosisCall).where(col(DiagnosisCall.caller) == caller, col(DiagnosisCall.at) <= window_start)
            )
            count, oldest = session.execute(
                select(func.count(), func.min(DiagnosisCall.at)).where(col(DiagnosisCall.caller) == caller)
            ).one()
            if count >= self.per_minute:
                retry_after = max(1, int((oldest + timedelta(seconds=self.WINDOW) - now).total_seconds()) + 1)
                raise TooManyRequests(
                    f"At most {self.per_minute} diagnoses a minute; try again in {retry_after} s.",
                    headers={"Retry-After": str(retry_after)},
                )
            session.add(DiagnosisCall(caller=caller, at=now))
            self._sweep(session, window_start)

    def _sweep(self, session: Any, window_start: datetime) -> None:
        # Callers who do not come back leave rows behind: each process clears the expired ones at most once a
        # window, so the table holds about one window's calls however many callers come and go.
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.WINDOW
        session.execute(delete(DiagnosisCall).where(col(DiagnosisCall.at) <= window_start))


class RecentDiagnoses:
    """Diagnoses of the last two minutes, per domain, shared by every process. The stored evidence keeps its
    own `checked_at`."""

    def __init__(self, engine: Engine, seconds: float = 120.0) -> None:
        self.engine = engine
        self.seconds = seconds

    def get(self, domain: str) -> Diagnosis | None:
        since = utcnow() - timedelta(seconds=self.seconds)
        with reading(self.engine) as session:
            found = session.get(RecentDiagnosis, domain)
            if found is None or found.checked_at <= since:
                return None
            return Diagnosis.model_validate(found.diagnosis)

    def put(self, domain: str, diagnosis: Diagnosis) -> Diagnosis:
        now = utcnow()
        try:
            with transaction(self.engine) as session:
                # Expired ones go as new ones come: the table holds about two minutes' domains.
                session.execute(
                    delete(RecentDiagnosis).where(
                        col(RecentDiagnosis.checked_at) <= now - timedelta(seconds=self.seconds)
                    )
                )
                stored = diagnosis.model_dump(mode="json")
                session.merge(RecentDiagnosis(domain=domain, checked_at=now, diagnosis=stored))
        except IntegrityError:
            pass  # another replica stored a diagnosis of the same domain at the same moment: it serves as well
        return diagnosis
