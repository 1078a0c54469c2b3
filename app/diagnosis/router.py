"""`GET /v1/diagnostics/{domain}`: why a domain fails DANE, and the least weakening override."""

from __future__ import annotations

import time
from collections import deque
from threading import Lock
from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.core.auth import Principal, require
from app.core.config import ROLES, Settings
from app.core.errors import InvalidInput, TooManyRequests, problem_responses
from app.diagnosis.config import DiagnosisConfig, InvalidDomain, normalize_domain
from app.diagnosis.engine import diagnose
from app.diagnosis.models import Diagnosis

router = APIRouter(prefix="/v1/diagnostics", tags=["diagnostics"])


def diagnosis_config(settings: Settings) -> DiagnosisConfig:
    return DiagnosisConfig(
        resolver=settings.dns_resolver,
        smtp_port=settings.smtp_port,
        timeout=settings.diagnosis_timeout_seconds,
        allow_reserved=settings.diagnosis_allow_reserved,
        concurrency=settings.diagnosis_concurrency,
        selftest_name=settings.dns_selftest_name,
    )


class RateLimiter:
    """At most `per_minute` calls per caller in any 60 s window (per API process)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._calls: dict[str, deque[float]] = {}
        self._lock = Lock()
        self._next_sweep = 0.0

    def check(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            calls = self._calls.setdefault(caller, deque())
            while calls and calls[0] <= now - self.WINDOW:
                calls.popleft()
            if len(calls) >= self.per_minute:
                retry_after = max(1, int(calls[0] + self.WINDOW - now) + 1)
                raise TooManyRequests(
                    f"At most {self.per_minute} diagnoses a minute; try again in {retry_after} s.",
                    headers={"Retry-After": str(retry_after)},
                )
            calls.append(now)

    def __len__(self) -> int:
        """Callers currently tracked."""
        return len(self._calls)

    def _sweep(self, now: float) -> None:
        # Callers whose calls all left the window are dropped, at most once per window, so the table
        # holds only the last minute's callers however many come and go.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.WINDOW
        for caller in [c for c, calls in self._calls.items() if not calls or calls[-1] <= now - self.WINDOW]:
            del self._calls[caller]


def rate_limit_key(principal: Principal) -> str:
    """The machine client for integrations, else the person: an integration rotating X-On-Behalf-Of
    shares one budget."""
    return f"via:{principal.via}" if principal.via else f"actor:{principal.actor}"


@router.get(
    "/{domain}",
    response_model=Diagnosis,
    summary="Diagnose a recipient domain's DANE setup",
    responses=problem_responses(401, 403, 422, 429),
)
async def get_diagnosis(
    request: Request,
    principal: Annotated[Principal, require(*ROLES)],  # any role, but a role: not every valid token
    domain: Annotated[str, Path(max_length=300, description="Recipient mail domain, e.g. `example.org`.")],
) -> Diagnosis:
    """MX, DNSSEC, TLSA and a STARTTLS probe of every MX address, as mailcow's Postfix would see them;
    a verdict (`ok`, `degraded`, `blocked`), the failure class and the recommended override."""
    try:
        name = normalize_domain(domain)
    except InvalidDomain as exc:
        raise InvalidInput.on("path.domain", str(exc)) from exc
    limiter: RateLimiter = request.app.state.diagnosis_limiter
    limiter.check(rate_limit_key(principal))
    return await diagnose(name, diagnosis_config(request.app.state.settings))
