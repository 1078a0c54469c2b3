"""`GET /v1/diagnostics/{domain}`: why a domain fails DANE, and the least weakening override."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.core.auth import Principal, require
from app.core.config import ROLES
from app.core.errors import InvalidInput, problem_responses
from app.diagnosis.config import InvalidDomain, normalize_domain
from app.diagnosis.models import Diagnosis
from app.diagnosis.service import diagnose_within_budget

router = APIRouter(prefix="/v1/diagnostics", tags=["diagnostics"])


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
    return await diagnose_within_budget(
        request.app.state.diagnosis_limiter, request.app.state.settings, principal, name
    )
