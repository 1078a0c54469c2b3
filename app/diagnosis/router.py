"""`GET /v1/diagnostics/{domain}`: why a domain fails DANE, and the least weakening override."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from threading import Lock
from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.core.auth import CurrentPrincipal
from app.core.config import Settings
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

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._calls: dict[str, deque[float]] = defaultdict(deque)
        self._lock = Lock()

    def check(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            calls = self._calls[caller]
            while calls and calls[0] <= now - 60:
                calls.popleft()
            if len(calls) >= self.per_minute:
                retry_after = max(1, int(calls[0] + 60 - now) + 1)
                raise TooManyRequests(
                    f"At most {self.per_minute} diagnoses a minute; try again in {retry_after} s.",
                    headers={"Retry-After": str(retry_after)},
                )
            calls.append(now)


@router.get(
    "/{domain}",
    response_model=Diagnosis,
    summary="Diagnose a recipient domain's DANE setup",
    responses=problem_responses(401, 422, 429),
)
async def get_diagnosis(
    request: Request,
    principal: CurrentPrincipal,
    domain: Annotated[str, Path(max_length=300, description="Recipient mail domain, e.g. `example.org`.")],
) -> Diagnosis:
    """MX, DNSSEC, TLSA and a STARTTLS probe of every MX address, as mailcow's Postfix would see them;
    a verdict (`ok`, `degraded`, `blocked`), the failure class and the recommended override."""
    try:
        name = normalize_domain(domain)
    except InvalidDomain as exc:
        raise InvalidInput.on("path.domain", str(exc)) from exc
    limiter: RateLimiter = request.app.state.diagnosis_limiter
    limiter.check(f"{principal.via or ''}|{principal.actor}")
    return await diagnose(name, diagnosis_config(request.app.state.settings))
