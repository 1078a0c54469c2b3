"""The diagnosis stored with a request, and the findings reviewers see (or that refuse it)."""

from __future__ import annotations

import logging
from typing import Any

import anyio.from_thread
from fastapi import FastAPI

from app.core.config import Settings
from app.diagnosis.assess import assess_request
from app.diagnosis.engine import diagnose
from app.diagnosis.router import diagnosis_config
from app.overrides.postfix import mx_domain_of

log = logging.getLogger("app.overrides.evidence")


def findings_for(diagnosis: Any, policy: str, parameters: str, settings: Settings) -> list[dict[str, Any]]:
    """Findings as stored with the request; rules listed in TLSO_REFUSE_RULES refuse it."""
    return [
        {**finding.model_dump(mode="json"), "refused": finding.rule in settings.refuse_rules}
        for finding in assess_request(diagnosis, policy, parameters)
    ]


def gather_evidence(
    app: FastAPI, destination: str, policy: str, parameters: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Diagnose the destination's domain (from a worker thread of the API) and assess the request."""
    settings: Settings = app.state.settings
    domain = mx_domain_of(destination)
    if not settings.diagnosis_on_create or domain is None:
        return None, []
    try:
        diagnosis = anyio.from_thread.run(diagnose, domain, diagnosis_config(settings))
    except Exception as exc:  # evidence is best effort: a failed diagnosis must not block an urgent request
        log.warning("diagnosis of %s failed: %s", domain, exc)
        return {"error": f"diagnosis failed: {exc}"}, []
    return diagnosis.model_dump(mode="json"), findings_for(diagnosis, policy, parameters, settings)
