"""app.diagnosis.policy: Postfix's protocols grammar and what an override does on stored facts."""

from __future__ import annotations

from typing import Any

import pytest

from app.diagnosis.models import AddressResult, MxHost, SmtpProbe
from app.diagnosis.policy import POLICY_STRENGTH, admitted_protocols, parse_protocols, simulate
from app.mailcow.policies import POLICIES
from tests.diagnosis.test_rules import leaf


def test_every_policy_has_a_strength_and_nothing_else_has_one() -> None:
    """The policies are spelled once (app/mailcow/policies.py); the strengths name each of them."""
    assert sorted(POLICY_STRENGTH) == sorted(POLICIES)


@pytest.mark.parametrize(
    ("spec", "admitted"),
    [
        (">=TLSv1.2", {"TLSv1.2", "TLSv1.3"}),
        (">=TLSv1", {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}),
        ("<=TLSv1.1", {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"}),
        ("!SSLv2:!SSLv3", {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}),
        ("!SSLv2, !SSLv3 !TLSv1", {"TLSv1.1", "TLSv1.2", "TLSv1.3"}),
        ("TLSv1.2:TLSv1.3", {"TLSv1.2", "TLSv1.3"}),
        (">=TLSv1.1:<=TLSv1.2", {"TLSv1.1", "TLSv1.2"}),
        (">=TLSv1:!TLSv1.1", {"TLSv1", "TLSv1.2", "TLSv1.3"}),
    ],
)
def test_admitted_protocols(spec: str, admitted: set[str]) -> None:
    assert admitted_protocols(spec) == admitted


def test_without_protocols_mailcows_floor_applies() -> None:
    assert parse_protocols("match=AA:BB") == {"TLSv1.2", "TLSv1.3"}
    assert parse_protocols("match=AA:BB protocols=>=TLSv1") == {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}


def _legacy_host(version: str) -> MxHost:
    failed = SmtpProbe(port=25, sni=None, starttls_offered=True, failed_stage="handshake", error="x")
    legacy = SmtpProbe(port=25, sni=None, starttls_offered=True, tls_version=version, chain=[leaf("AA:BB")])
    address = AddressResult(
        address="192.0.2.1",
        family="ipv4",
        status="handshake-failed",
        would_deliver=False,
        detail="",
        probe=failed,
        probe_legacy=legacy,
    )
    return MxHost(
        name="mx.d.example",
        preference=10,
        canonical_name="mx.d.example",
        dnssec="secure",
        postfix_level="dane",
        status="handshake-failed",
        would_deliver=False,
        explanation="",
        addresses=[address],
    )


@pytest.mark.parametrize(
    ("policy", "parameters", "delivers", "plaintext"),
    [
        ("encrypt", "", False, False),
        ("encrypt", "protocols=>=TLSv1.1", True, False),
        ("encrypt", "protocols=>=TLSv1", True, False),
        ("encrypt", "protocols=>=TLSv1.2", False, False),
        # Admits only TLS 1.0: whether the host speaks it besides TLS 1.1 is unknown.
        ("encrypt", "protocols=TLSv1", None, False),
        ("fingerprint", "match=AA:BB protocols=>=TLSv1", False, False),
        ("dane", "protocols=>=TLSv1", False, False),
        ("may", "", True, True),
        ("may", "protocols=>=TLSv1", True, False),
        ("none", "", True, True),
    ],
)
def test_simulate_a_tls_1_1_host(policy: Any, parameters: str, delivers: bool | None, plaintext: bool) -> None:
    (outcome,) = simulate(policy, parameters, "d.example", [_legacy_host("TLSv1.1")])
    assert (outcome.delivers, outcome.plaintext) == (delivers, plaintext)
