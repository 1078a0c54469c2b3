"""Making and publishing signed checkpoints of the chain head (the anchor outside the table).

A checkpoint is recorded as the audit event `audit.checkpoint`, written under the chain's lock right
after the row it signs, so it is itself part of the chain and reaches every webhook sink like any
other event; it is also written to the log (logger `app.audit.checkpoint`, always at INFO). Both are
out of reach of someone who can rewrite only the database. The worker makes one when
`TLSO_AUDIT_CHECKPOINT_EVERY_EVENTS` rows are unsigned or the oldest unsigned row is
`TLSO_AUDIT_CHECKPOINT_INTERVAL_SECONDS` old; `python -m app audit checkpoint` makes one at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent, AuditHead
from app.audit.refusals import close_refusal_windows
from app.audit.service import record
from app.audit.signing import CHECKPOINT_ACTION, Checkpoint, Signer
from app.core.config import CoreSettings
from app.core.db import reading, transaction, utcnow
from app.core.logs import CHECKPOINT_LOGGER

log = logging.getLogger(CHECKPOINT_LOGGER)


def write_checkpoint(engine: Engine, signer: Signer, settings: CoreSettings | None = None) -> Checkpoint | None:
    """Sign the chain head and record it (with `settings`: only if a checkpoint is due); publish it."""
    if settings is not None:
        with reading(engine) as session:  # the common case, nothing due, takes no lock
            if not _due(session, settings, utcnow()):
                return None
    with transaction(engine) as session:
        head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
        if head.seq == head.checkpoint_seq or (settings is not None and not _due(session, settings, utcnow())):
            return None  # nothing new since the last checkpoint (another worker may just have made it)
        checkpoint = signer.sign(head.seq, head.hash, utcnow())
        record(session, actor="system", action=CHECKPOINT_ACTION, after=checkpoint.model_dump())
        head.checkpoint_seq = head.seq + 1  # the checkpoint's own row, appended when this commits
        session.add(head)
    publish(checkpoint)
    return checkpoint


def _due(session: Session, settings: CoreSettings, now: datetime) -> bool:
    head = session.get(AuditHead, 1)
    if head is None or head.seq == head.checkpoint_seq:
        return False
    if head.seq < head.checkpoint_seq or head.seq - head.checkpoint_seq >= settings.audit_checkpoint_every_events:
        return True  # (a head behind its last checkpoint was rolled back: sign what is there, visibly)
    oldest = session.get(AuditEvent, head.checkpoint_seq + 1)
    interval = timedelta(seconds=settings.audit_checkpoint_interval_seconds)
    return oldest is None or oldest.at <= now - interval


def latest_checkpoint(engine: Engine) -> Checkpoint | None:
    with reading(engine) as session:
        head = session.get(AuditHead, 1)
        event = session.get(AuditEvent, head.checkpoint_seq) if head and head.checkpoint_seq else None
        if event is None or event.action != CHECKPOINT_ACTION:
            event = session.exec(
                select(AuditEvent)
                .where(AuditEvent.action == CHECKPOINT_ACTION)
                .order_by(col(AuditEvent.seq).desc())
                .limit(1)
            ).first()
        return Checkpoint.model_validate(event.after) if event is not None else None


def publish(checkpoint: Checkpoint) -> None:
    """The log line is one of the two places a database owner cannot rewrite (the webhooks are the other)."""
    log.info(
        "audit.checkpoint %s",
        checkpoint.model_dump_json(),
        extra={"fields": {"checkpoint": checkpoint.model_dump()}},
    )


def audit_upkeep(engine: Engine, settings: CoreSettings, signer: Signer | None) -> None:
    """The worker's audit duties each pass: close refusal windows, then sign the head when due."""
    close_refusal_windows(engine, settings)
    if signer is not None:
        write_checkpoint(engine, signer, settings)
