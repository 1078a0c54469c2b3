"""The remediation watch: re-diagnose active overrides; notice when the recipient has fixed DANE — and,
for `TLSO_QUEUE_WATCH_SECONDS` after an expired, revoked or remediated end, when it breaks again.

After `TLSO_REMEDIATION_CHECKS` clean diagnoses in a row the worker records `recipient.fixed` in the
audit trail (which the notification sinks carry) and, with `TLSO_REMEDIATION=end`, ends the override
early as `remediated`. A later failure starts the count again. Bookkeeping (`clean_checks`,
`last_checked_at`) does not bump the override's version, so a reviewer's ETag is not invalidated by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, or_
from sqlmodel import Session, col, select

from app.audit.service import record
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.diagnosis.assess import is_clean
from app.diagnosis.engine import diagnose
from app.diagnosis.models import Diagnosis
from app.diagnosis.service import diagnosis_config
from app.overrides import lifecycle
from app.overrides.models import EndReason, Override, OverrideState
from app.overrides.postfix import mx_domain_of
from app.worker import store

log = logging.getLogger("app.worker.recheck")

Diagnose = Callable[[str], Awaitable[Diagnosis]]


def _due(engine: Engine, settings: Settings, limit: int) -> list[tuple[int, str, datetime | None]]:
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.recheck_interval_seconds)
    watched_since = now - timedelta(seconds=settings.queue_watch_seconds)
    with transaction(engine) as session:
        rows = session.exec(
            select(Override)
            .where(
                or_(
                    col(Override.state) == OverrideState.active,
                    # Ended ones for TLSO_QUEUE_WATCH_SECONDS: a recipient that breaks again is noticed.
                    col(Override.state).in_(sorted(lifecycle.WATCHED_ENDS)) & (col(Override.ended_at) >= watched_since),
                )
            )
            .where(or_(col(Override.last_checked_at).is_(None), col(Override.last_checked_at) <= cutoff))
            .order_by(col(Override.last_checked_at).is_(None).desc(), col(Override.last_checked_at))
            .limit(limit)
        ).all()
        return [(row.id or 0, row.destination, row.last_checked_at) for row in rows]


def _record_result(engine: Engine, settings: Settings, override_id: int, diagnosis: Diagnosis) -> str:
    clean = is_clean(diagnosis)
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        if override.state in lifecycle.WATCHED_ENDS:
            return _after_the_end(session, override, diagnosis, clean)
        if override.state != OverrideState.active:
            return "gone"
        checks = override.clean_checks + 1 if clean else 0
        store.count_clean_checks(session, override_id, checks)
        if clean and checks == settings.remediation_checks:
            record(
                session,
                actor="system",
                action="recipient.fixed",
                override_id=override_id,
                after={"clean_checks": checks, "verdict": diagnosis.verdict, "remediation": settings.remediation},
                comment=f"{diagnosis.domain} passes DANE again ({checks} checks in a row): {diagnosis.explanation}",
            )
            if settings.remediation == "end":
                session.refresh(override)
                lifecycle.begin_removal(
                    session,
                    override,
                    EndReason.remediated,
                    actor="system",
                    via=None,
                    comment="the recipient fixed DANE; the override is no longer needed",
                    settings=settings,
                )
                return "ended"
            return "fixed"
        if not clean and override.clean_checks >= settings.remediation_checks:
            record(
                session,
                actor="system",
                action="recipient.regressed",
                override_id=override_id,
                after={"verdict": diagnosis.verdict, "failure_class": diagnosis.failure_class},
                comment=f"{diagnosis.domain} fails again after passing: {diagnosis.explanation}",
            )
        return "clean" if clean else "failing"


def _after_the_end(session: Session, override: Override, diagnosis: Diagnosis, clean: bool) -> str:
    """An ended override's recipient: `recipient.regressed` when its diagnosis turns `blocked` after passing
    (once per episode: the count of clean checks starts again), with the evidence and what to request."""
    override_id = override.id or 0
    blocked = diagnosis.verdict == "blocked"
    if blocked and override.clean_checks > 0:
        store.count_clean_checks(session, override_id, 0)
        record(
            session,
            actor="system",
            action="recipient.regressed",
            override_id=override_id,
            after={
                "verdict": diagnosis.verdict,
                "failure_class": diagnosis.failure_class,
                "explanation": diagnosis.explanation[:500],
                "checked_at": diagnosis.checked_at.isoformat(),
                "ended": override.state.value,
                "request_again": {
                    "target": override.target,
                    "destination": override.destination,
                    "policy": diagnosis.recommended.policy if diagnosis.recommended else override.policy,
                },
            },
            comment=f"{diagnosis.domain} is blocked again after the override ended ({override.state.value}): "
            f"{diagnosis.explanation}; mail to it defers until it is fixed or a new override is approved",
        )
        return "regressed"
    if clean:
        store.count_clean_checks(session, override_id, override.clean_checks + 1)
    elif blocked:
        store.count_clean_checks(session, override_id, 0)
    return "clean" if clean else "failing"


async def recheck_due(engine: Engine, settings: Settings, run: Diagnose | None = None, limit: int = 20) -> int:
    """Re-diagnose the active overrides whose check is due; returns how many were checked."""
    if run is None:
        config = diagnosis_config(settings)

        async def run(domain: str) -> Diagnosis:
            return await diagnose(domain, config)

    checked = 0
    for override_id, destination, seen in await asyncio.to_thread(_due, engine, settings, limit):
        if not await asyncio.to_thread(store.claim_recheck, engine, override_id, seen):
            continue  # another worker has it
        domain = mx_domain_of(destination)
        if domain is None:
            continue  # a next-hop or parent-domain entry: no single recipient domain to diagnose
        try:
            diagnosis = await run(domain)
        except Exception as exc:  # one bad domain must not stop the watch of the others
            log.warning("recheck of override %s (%s) failed: %s", override_id, domain, exc)
            continue
        outcome = await asyncio.to_thread(_record_result, engine, settings, override_id, diagnosis)
        log.info("recheck of override %s (%s): %s", override_id, domain, outcome)
        checked += 1
    return checked


async def watch(engine: Engine, settings: Settings, stop: asyncio.Event, run: Diagnose | None = None) -> None:
    """The worker's remediation task: recheck what is due, then wait (at most a minute) and look again.

    It runs beside the apply/remove loop, so a slow diagnosis never delays an approval or a removal.
    """
    limit = 20
    pause = min(settings.recheck_interval_seconds, 60.0)
    while not stop.is_set():
        try:
            busy = await recheck_due(engine, settings, run, limit=limit) == limit
        except Exception:  # the database is down: wait it out like the main loop does
            log.exception("remediation watch failed; trying again later")
            busy = False
        if not busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(pause, 1.0))
