"""The reviewer's summary line: what mail loses, the verdict, the recommendation, from stored data only."""

from __future__ import annotations

from typing import Any

import pytest

from app.mailcow.policies import POLICIES
from app.overrides.summary import LOSSES, summarize, verdict_text

BLOCKED_A: dict[str, Any] = {
    "verdict": "blocked",
    "failure_class": "A",
    "recommended": {"policy": "fingerprint", "parameters": "match=AA:BB"},
}


def test_the_line_a_reviewer_reads_first() -> None:
    summary = summarize("fingerprint", "match=AA:BB", BLOCKED_A)
    assert summary.line == "fingerprint · blocked (A: TLSA mismatch) · certificate pinned, not checked against DANE"
    assert (summary.recommended, summary.weaker_than_recommended) == ("fingerprint match=AA:BB", False)


def test_a_weaker_request_says_so_and_what_mail_loses() -> None:
    summary = summarize("none", "", BLOCKED_A)
    assert summary.loses == ("plaintext always (TLS off)",)
    assert summary.weaker_than_recommended is True
    assert summary.line.endswith("· weaker than the recommended fingerprint")
    may = summarize("may", "", {"verdict": "blocked", "failure_class": "B", "recommended": {"policy": "may"}})
    assert may.loses == ("plaintext allowed", "certificate not checked") and may.weaker_than_recommended is False
    assert may.verdict == "blocked (B: no STARTTLS despite TLSA)"


def test_a_degraded_domain_is_compared_with_its_contingency() -> None:
    degraded = {
        "verdict": "degraded",
        "failure_class": "A''",
        "recommended": None,
        "contingency": {"policy": "encrypt"},
    }
    summary = summarize("may", "", degraded)
    assert summary.verdict == "degraded (A'': TLSA mismatch on some MX hosts)" and summary.weaker_than_recommended


@pytest.mark.parametrize("diagnosis", [None, {}, {"error": "not diagnosed: rate limited"}])
def test_without_a_diagnosis_only_the_policy_speaks(diagnosis: Any) -> None:
    summary = summarize("encrypt", "", diagnosis)
    assert summary.line == "encrypt · not diagnosed · certificate not checked"
    assert (summary.verdict, summary.recommended, summary.weaker_than_recommended) == (None, None, None)


def test_every_policy_has_its_losses_and_only_dane_only_loses_nothing() -> None:
    assert set(LOSSES) == set(POLICIES)
    assert [p for p, lost in LOSSES.items() if not lost] == ["dane-only"]
    assert summarize("dane-only", "", None).loses_text == "nothing (stricter than the default)"
    assert verdict_text({"verdict": "ok", "failure_class": None}) == "ok"
