"""Diagnosing on behalf of a caller: the settings as a diagnosis configuration, and a per-caller budget
(app/diagnosis/budget.py, shared by every replica) used by `GET /v1/diagnostics` and the evidence taken
when a request is created."""

from __future__ import annotations

import anyio.to_thread

from app.core.auth import Principal
from app.core.config import Settings
from app.diagnosis.budget import RateLimiter
from app.diagnosis.config import DiagnosisConfig
from app.diagnosis.engine import diagnose
from app.diagnosis.models import Diagnosis


def diagnosis_config(settings: Settings) -> DiagnosisConfig:
    return DiagnosisConfig(
        resolver=settings.dns_resolver,
        smtp_port=settings.smtp_port,
        timeout=settings.diagnosis_timeout_seconds,
        allow_reserved=settings.diagnosis_allow_reserved,
        concurrency=settings.diagnosis_concurrency,
        selftest_name=settings.dns_selftest_name,
    )


def rate_limit_key(principal: Principal) -> str:
    """The machine client for integrations, else the person: an integration rotating X-On-Behalf-Of
    shares one budget."""
    return f"via:{principal.via}" if principal.via else f"actor:{principal.key}"


async def diagnose_within_budget(
    limiter: RateLimiter, settings: Settings, principal: Principal, domain: str
) -> Diagnosis:
    """Diagnose `domain` if the caller's budget allows (else TooManyRequests, with Retry-After)."""
    await anyio.to_thread.run_sync(limiter.check, rate_limit_key(principal))  # a database round trip
    return await diagnose(domain, diagnosis_config(settings))
