"""The diagnosis stored with a request, and the findings reviewers see (or that refuse it)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def gather_evidence(
    app: FastAPI, destination: str, policy: str, parameters: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Diagnose the destination's domain; wired to the diagnosis engine once it is configured."""
    return None, []
