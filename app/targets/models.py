"""Per-target bookkeeping shared by every worker and the API process."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.core.db import UTCDateTime


class MailcowTarget(SQLModel, table=True):
    """One mailcow instance: when it is reconciled next (and by whom), and whether calls are paused."""

    __tablename__ = "mailcow_target"

    name: str = Field(primary_key=True, max_length=100)
    reconcile_due_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_reconcile_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_reconcile_error: str | None = None
    rows_owned: int = Field(default=0)
    rows_foreign: int = Field(default=0)
    # After an authentication failure nobody calls the target until then (fail2ban bans repeat offenders)
    # with a key that was refused: `refused_keys` holds their fingerprints (salted hashes, space-separated,
    # see `Target.key_fingerprint`), so a worker or API process configured with another key goes on.
    paused_until: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    pause_reason: str | None = None
    refused_keys: str | None = None
