"""The diagnosis stored with a request, and the findings reviewers see (or that refuse it)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.from_thread

from app.core.auth import Principal
from app.core.config import Settings
from app.core.db import reading
from app.core.errors import TooManyRequests
from app.diagnosis.assess import assess_request
from app.diagnosis.budget import RateLimiter, RecentDiagnoses
from app.diagnosis.models import Diagnosis, Finding
from app.diagnosis.service import diagnose_within_budget
from app.mailcow.dest import DEVIATION_NAMES, deviations_in, transitional_form, unicode_form
from app.overrides.lifecycle import find_live
from app.overrides.permissions import ActionContext
from app.overrides.postfix import mx_domain_of

log = logging.getLogger("app.overrides.evidence")


def findings_for(diagnosis: Any, policy: str, parameters: str, settings: Settings) -> list[dict[str, Any]]:
    """Findings as stored with the request; rules listed in TLSO_REFUSE_RULES refuse it."""
    return _stored(assess_request(diagnosis, policy, parameters), settings)


def request_findings(destination: str, policy: str, settings: Settings) -> list[dict[str, Any]]:
    """Findings that need no diagnosis, so every request gets them (a next hop, diagnosis off or failed, a
    domain without STARTTLS): what `may` and `none` let through, an IDNA deviation in the name."""
    found = [plaintext_allowed(destination, policy), idna_deviation(destination)]
    return _stored([finding for finding in found if finding is not None], settings)


def plaintext_allowed(destination: str, policy: str) -> Finding | None:
    """`may` and `none` let mail go unencrypted, whatever the diagnosis says: a reviewer must read it."""
    if policy == "may":
        message = (
            f"may allows plaintext: mail to {destination} goes unencrypted when a host offers no STARTTLS or the "
            "TLS handshake fails, and no certificate is checked (anyone on the path can read or redirect it)"
        )
    elif policy == "none":
        message = f"none turns TLS off: all mail to {destination} goes in plaintext"
    else:
        return None
    return Finding(rule="plaintext_allowed", severity="warning", message=message)


def _stored(findings: list[Finding], settings: Settings) -> list[dict[str, Any]]:
    return [
        {**finding.model_dump(mode="json"), "refused": finding.rule in settings.refuse_rules} for finding in findings
    ]


def idna_deviation(destination: str) -> Finding | None:
    """Which form of a name with ß, ς, ZWJ or ZWNJ this override covers, and which mailcow's UI would store.

    The override is stored in IDNA2008 form (see `app.overrides.postfix`); mailcow's UI stores the same
    name typed by hand in UTS #46 transitional form, another name (app.mailcow.dest). Postfix looks the
    policy up by the recipient domain exactly as the message carries it (no IDNA conversion for the
    table lookup), so which row applies depends on which A-label the sender's software made.
    """
    found = deviations_in(destination)
    other = transitional_form(destination)
    if not found or other is None:
        return None
    name = unicode_form(destination)
    which = ", ".join(DEVIATION_NAMES[ch] for ch in found)
    return Finding(
        rule="idna_deviation",
        severity="warning",
        message=(
            f"{name} contains {which}, which IDNA2003 and IDNA2008 treat differently. This override is stored "
            f"as {destination} (IDNA2008, the form Postfix 3.2 and later derives); mailcow's own UI would store "
            f"{name} as {other} (transitional UTS #46), another name. Postfix looks the policy up by the "
            f"recipient domain as the message carries it, so this override applies to mail for {destination} "
            f"and not to mail whose sender converted the name to {other}; a hand-made row at {other} is "
            "treated as a conflict."
        ),
    )


Found = tuple[dict[str, Any] | None, list[dict[str, Any]]]


class WouldBlock(Exception):
    """Raised by evidence asked for with `blocking=False` at the point where it would wait on I/O (a
    diagnosis, the database, mailcow): the caller on the event loop gathers it in a thread instead."""


class QueueReader(Protocol):
    """Reads the target's mail queue for a new request: the evidence to store, or None (with `blocking=False`:
    `WouldBlock` instead of any I/O). `create_app` hands it over (app.targets.queue.queue_on_create)."""

    def __call__(
        self, ctx: ActionContext, target: str, destination: str, time_limit: float | None, *, blocking: bool = True
    ) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Evidence:
    """How a new request's evidence is gathered: within the caller's diagnosis budget (the one
    `GET /v1/diagnostics` uses), from a recent diagnosis of the same domain where there is one."""

    limiter: RateLimiter
    recent: RecentDiagnoses
    time_limit: float | None = None  # a caller that must answer quickly (Slack: 3 s) takes no longer
    queue_reader: QueueReader | None = None  # None: the worker's refresh reads the queue later

    def gather(
        self, ctx: ActionContext, target: str, destination: str, policy: str, parameters: str, *, blocking: bool = True
    ) -> Found:
        """Diagnose the destination's domain (from a worker thread of the API) and assess the request.

        Nothing is probed for a request that will be a replay or a 409 (read without a write lock, so the
        probe holds up nobody), nor for a next hop. Over the caller's budget the request is still taken,
        without evidence: an urgent request never waits. With `blocking=False`: `WouldBlock` instead of
        any I/O (the findings of a request that is not diagnosed need none)."""
        settings = ctx.settings
        named = request_findings(destination, policy, settings)
        domain = mx_domain_of(destination)
        if not settings.diagnosis_on_create or domain is None:
            return None, named
        if not blocking:
            raise WouldBlock
        with reading(ctx.engine) as peek:
            replay = ctx.idempotency is not None and ctx.idempotency.answered(peek)
            if replay or find_live(peek, target, destination):
                return None, []
        try:
            diagnosis = self.recent.get(domain) or self.recent.put(
                domain, anyio.from_thread.run(self._diagnose, settings, ctx.principal, domain)
            )
        except TimeoutError:
            return {"error": f"not diagnosed within {self.time_limit:g} s; see GET /v1/diagnostics/{domain}."}, named
        except TooManyRequests as exc:
            return {"error": f"not diagnosed: {exc.detail} See GET /v1/diagnostics/{domain}."}, named
        except Exception as exc:  # evidence is best effort: a failed diagnosis must not block an urgent request
            log.warning("diagnosis of %s failed: %s", domain, exc)
            return {"error": f"diagnosis failed: {exc}"}, named
        return diagnosis.model_dump(mode="json"), findings_for(diagnosis, policy, parameters, settings) + named

    def queue(
        self, ctx: ActionContext, target: str, destination: str, *, blocking: bool = True
    ) -> dict[str, Any] | None:
        """What mailcow's queue holds deferred for the destination (app.overrides.stuck), read within
        `TLSO_QUEUE_EVIDENCE_BUDGET_SECONDS`; a failure is recorded in it and never refuses the request.
        With `blocking=False`: `WouldBlock` instead of any I/O."""
        if self.queue_reader is None:
            return None
        return self.queue_reader(ctx, target, destination, self.time_limit, blocking=blocking)

    async def _diagnose(self, settings: Settings, principal: Principal, domain: str) -> Diagnosis:
        work = diagnose_within_budget(self.limiter, settings, principal, domain)
        return await (work if self.time_limit is None else asyncio.wait_for(work, self.time_limit))
