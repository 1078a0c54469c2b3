"""Diagnosing on behalf of a caller: the settings as a diagnosis configuration, and a per-caller budget
shared by `GET /v1/diagnostics` and the evidence taken when a request is created."""

from __future__ import annotations

import time
from collections import deque
from threading import Lock

from app.core.auth import Principal
from app.core.config import Settings
from app.core.errors import TooManyRequests
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
    return f"via:{principal.via}" if principal.via else f"actor:{principal.key}"


async def diagnose_within_budget(
    limiter: RateLimiter, settings: Settings, principal: Principal, domain: str
) -> Diagnosis:
    """Diagnose `domain` if the caller's budget allows (else TooManyRequests, with Retry-After)."""
    limiter.check(rate_limit_key(principal))
    return await diagnose(domain, diagnosis_config(settings))
