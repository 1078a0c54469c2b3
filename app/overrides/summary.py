"""The reviewer's summary of a request in one line: what mail loses under the policy, what the diagnosis
found, and whether the request is weaker than what the diagnosis recommends.

    >>> summarize("fingerprint", "match=AA:BB", {"verdict": "blocked", "failure_class": "A",
    ...     "recommended": {"policy": "fingerprint", "parameters": "match=AA:BB"}}).line
    'fingerprint · blocked (A: TLSA mismatch) · certificate pinned, not checked against DANE'

Pure: it reads only the policy, its parameters and the diagnosis as stored with the request (a dict, or
None, or `{"error": …}` when the request was taken without one), so Slack messages, webhook events and
API answers say the same thing about the same request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.diagnosis.policy import POLICY_STRENGTH

_STRENGTH: dict[str, int] = {str(policy): strength for policy, strength in POLICY_STRENGTH.items()}

# What mail to the destination loses under each policy, compared with mailcow's default (opportunistic
# DANE plus the MTA-STS policy service): an override replaces both for its destination.
LOSSES: dict[str, tuple[str, ...]] = {
    "none": ("plaintext always (TLS off)",),
    "may": ("plaintext allowed", "certificate not checked"),
    "encrypt": ("certificate not checked",),
    "dane": ("MTA-STS not consulted",),
    "dane-only": (),
    "verify": ("not checked against DANE", "MX names trusted from unsigned DNS"),
    "secure": ("not checked against DANE",),
    "fingerprint": ("certificate pinned, not checked against DANE",),
}

# dane.md §2.2, in the fewest words a reviewer needs.
FAILURE_CLASSES: dict[str, str] = {
    "A": "TLSA mismatch",
    "A'": "TLSA mismatch (certificate re-issued)",
    "A''": "TLSA mismatch on some MX hosts",
    "B": "no STARTTLS despite TLSA",
    "C": "only unusable TLSA",
    "D": "TLSA in an unsigned zone",
    "D'": "unsigned domain, signed MX",
    "E": "TLSA lookup fails",
    "F": "DNSSEC-bogus domain",
    "G": "DNSSEC-bogus MX host",
    "H": "DANE-TA chain problem",
    "I": "DANE-EE leaf expired or misnamed",
    "J": "no TLSA",
    "K": "resolver does not validate",
}


@dataclass(frozen=True)
class ReviewSummary:
    """What a reviewer reads first. `verdict`, `recommended` and `weaker_than_recommended` are None
    when the request carries no diagnosis (a next hop, diagnosis off or failed)."""

    line: str
    loses: tuple[str, ...]
    verdict: str | None
    recommended: str | None
    weaker_than_recommended: bool | None

    @property
    def loses_text(self) -> str:
        return ", ".join(self.loses) if self.loses else "nothing (stricter than the default)"


def summarize(policy: str, parameters: str, diagnosis: Mapping[str, Any] | None) -> ReviewSummary:
    """The summary of a request for `policy parameters` given the diagnosis stored with it."""
    loses = LOSSES.get(policy, ("unknown policy",))
    verdict = verdict_text(diagnosis)
    best = _recommendation(diagnosis)
    recommended = None if best is None else f"{best[0]} {best[1]}".strip()
    weaker = None
    if best is not None and policy in _STRENGTH and best[0] in _STRENGTH:
        weaker = _STRENGTH[policy] < _STRENGTH[best[0]]
    parts = [policy, verdict or "not diagnosed", ", ".join(loses) or "nothing lost (stricter than the default)"]
    if weaker and best is not None:
        parts.append(f"weaker than the recommended {best[0]}")
    return ReviewSummary(
        line=" · ".join(parts),
        loses=loses,
        verdict=verdict,
        recommended=recommended,
        weaker_than_recommended=weaker,
    )


def verdict_text(diagnosis: Mapping[str, Any] | None) -> str | None:
    """`blocked (A: TLSA mismatch)`, `ok`, … or None without a diagnosis."""
    if not diagnosis or not isinstance(diagnosis.get("verdict"), str):
        return None
    verdict = str(diagnosis["verdict"])
    failure_class = diagnosis.get("failure_class")
    if isinstance(failure_class, str) and failure_class:
        label = FAILURE_CLASSES.get(failure_class, "")
        return f"{verdict} ({failure_class}: {label})" if label else f"{verdict} ({failure_class})"
    return verdict


def _recommendation(diagnosis: Mapping[str, Any] | None) -> tuple[str, str] | None:
    if not diagnosis:
        return None
    for key in ("recommended", "contingency"):
        option = diagnosis.get(key)
        if isinstance(option, Mapping) and isinstance(option.get("policy"), str):
            return str(option["policy"]), str(option.get("parameters") or "")
    return None
