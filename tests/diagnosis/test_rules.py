"""app.diagnosis.rules on hand-built facts: Postfix's decisions without a network or a lab."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.diagnosis.certs import DaneMatch
from app.diagnosis.models import (
    AddressResult,
    CertificateInfo,
    DnsLookup,
    MxHost,
    SmtpProbe,
    TlsaRecord,
    TlsaResult,
)
from app.diagnosis.rules import (
    Family,
    any_delivers,
    domain_verdict,
    host_class,
    judge_address,
    plan_addresses,
    postfix_level,
    recommend,
    resolver_validates,
)

DOMAIN = "d.example"


def leaf(fingerprint: str = "AA:BB") -> CertificateInfo:
    now = datetime.now(UTC)
    digest = fingerprint.replace(":", "").lower()
    return CertificateInfo(
        depth=0,
        subject="CN=mx.d.example",
        issuer="CN=mx.d.example",
        not_before=now,
        not_after=now,
        dns_names=["mx.d.example"],
        key_type="EC secp256r1",
        tlsa_3_1_1=digest,
        tlsa_3_0_1="00" + digest,
        pkey_fingerprint=fingerprint,
        cert_fingerprint="00:" + fingerprint,
        der_b64="",
    )


def probe(*, chain: bool = True, starttls: bool = True, failed: Any = None, sni: str | None = None) -> SmtpProbe:
    if not starttls:
        return SmtpProbe(port=25, sni=sni, starttls_offered=False)
    if failed:
        return SmtpProbe(port=25, sni=sni, starttls_offered=failed != "connect", failed_stage=failed, error="x")
    return SmtpProbe(port=25, sni=sni, starttls_offered=True, tls_version="TLSv1.3", chain=[leaf()] if chain else [])


def tlsa(state: Any, records: list[TlsaRecord] | None = None) -> TlsaResult:
    return TlsaResult(state=state, base_domain="mx.d.example", records=records or [])


def record(usage: int, selector: int) -> TlsaRecord:
    return TlsaRecord(usage=usage, selector=selector, mtype=1, data="ab" * 32, usable=usage in (2, 3), text="")


def lookup(*, ad: bool = True, rcode: str = "NOERROR", security: Any = None) -> DnsLookup:
    return DnsLookup(
        qname=DOMAIN,
        rdtype="MX",
        rcode=rcode,
        ad=ad,
        security=security or ("secure" if ad else "insecure"),
        canonical_name=DOMAIN,
    )


def address(would: bool | None, status: Any = "pass", fingerprint: str = "AA:BB", **fields: Any) -> AddressResult:
    chain = [leaf(fingerprint)] if fingerprint else []
    return AddressResult(
        address=fields.pop("address", "192.0.2.1"),
        family=fields.pop("family", "ipv4"),
        status=status,
        would_deliver=would,
        detail="",
        probe=fields.pop(
            "probe",
            SmtpProbe(port=25, sni=None, starttls_offered=True, tls_version="TLSv1.3" if chain else None, chain=chain),
        ),
        **fields,
    )


def host(name: str, addresses: list[AddressResult], **fields: Any) -> MxHost:
    states = [a.would_deliver for a in addresses]
    return MxHost(
        name=name,
        preference=fields.pop("preference", 10),
        canonical_name=name,
        dnssec=fields.pop("dnssec", "secure"),
        postfix_level=fields.pop("postfix_level", "dane"),
        status=fields.pop("status", addresses[0].status if addresses else "no-address"),
        would_deliver=any_delivers(states) if states else False,
        explanation="",
        addresses=addresses,
        **fields,
    )


# -- postfix_level, judge_address ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "level"),
    [("error", "defer"), ("usable", "dane"), ("unusable", "encrypt"), ("none", "may"), ("insecure", "may")],
)
def test_postfix_level(state: Any, level: str) -> None:
    assert postfix_level(tlsa(state)) == level


def test_judge_address_follows_the_level() -> None:
    passed = DaneMatch("pass", ["3 1 1 ab at depth 0"])
    stale = DaneMatch("tlsa-mismatch")
    assert judge_address("dane", tlsa("usable"), probe(), passed, True, "ipv4") == ("pass", True, "Verified")
    # A secure host under an insecure MX RRset: DANE still applies, logged `Trusted`.
    assert judge_address("dane", tlsa("usable"), probe(), passed, False, "ipv4") == ("pass", True, "Trusted")
    assert judge_address("dane", tlsa("usable"), probe(), stale, True, "ipv4") == ("tlsa-mismatch", False, None)
    assert judge_address("defer", tlsa("error"), probe(), None, True, "ipv4") == ("tlsa-lookup-error", False, None)
    no_starttls = probe(starttls=False)
    assert judge_address("dane", tlsa("usable"), no_starttls, None, True, "ipv4") == ("starttls-missing", False, None)
    assert judge_address("may", tlsa("none"), no_starttls, None, True, "ipv4") == ("no-tlsa", True, "plaintext")
    handshake = probe(failed="handshake")
    assert judge_address("may", tlsa("none"), handshake, None, True, "ipv4") == ("handshake-failed", True, "plaintext")
    assert judge_address("encrypt", tlsa("unusable"), handshake, None, True, "ipv4") == (
        "handshake-failed",
        False,
        None,
    )
    assert judge_address("encrypt", tlsa("unusable"), probe(), None, True, "ipv4") == (
        "tlsa-unusable",
        True,
        "Untrusted",
    )
    assert judge_address("may", tlsa("insecure"), probe(), None, True, "ipv4")[0] == "dane-not-applicable"


def test_judge_address_without_a_route_is_not_a_verdict() -> None:
    unreachable = SmtpProbe(port=25, sni=None, failed_stage="connect", error="[Errno 101] Network is unreachable")
    assert judge_address("dane", tlsa("usable"), unreachable, None, True, "ipv6") == ("not-probed", None, None)
    # The same on IPv4 is an unreachable host: Postfix cannot deliver there either.
    assert judge_address("dane", tlsa("usable"), unreachable, None, True, "ipv4") == ("unreachable", False, None)
    refused = unreachable.model_copy(update={"error": "[Errno 111] Connection refused"})
    assert judge_address("dane", tlsa("usable"), refused, None, True, "ipv6") == ("unreachable", False, None)


# -- host_class ---------------------------------------------------------------------------------


def test_host_class_sorts_failures() -> None:
    def failing(status: Any) -> list[tuple[AddressResult, DaneMatch | None]]:
        return [(address(False, status), None)]

    usable_311 = tlsa("usable", [record(3, 1)])
    assert host_class("dane", usable_311, failing("tlsa-mismatch")) == "A"
    assert host_class("dane", tlsa("usable", [record(3, 0)]), failing("tlsa-mismatch")) == "A'"
    assert host_class("dane", tlsa("usable", [record(2, 1)]), failing("tlsa-mismatch")) == "H"
    assert host_class("dane", usable_311, failing("name-mismatch")) == "H"
    assert host_class("dane", usable_311, failing("starttls-missing")) == "B"
    assert host_class("defer", tlsa("error"), failing("tlsa-lookup-error")) == "E"
    passing = [(address(True), DaneMatch("pass", ["3 1 1 ab at depth 0"]))]
    assert host_class("dane", usable_311, passing) is None
    assert host_class("may", tlsa("none"), [(address(True, "no-tlsa"), None)]) == "J"
    assert host_class("may", tlsa("not-applicable"), [(address(True, "dane-not-applicable"), None)]) == "D"
    assert host_class("encrypt", tlsa("unusable"), [(address(True, "tlsa-unusable"), None)]) == "C"
    expired = DaneMatch("pass", ["3 1 1 ab at depth 0"], leaf_expired=True)
    assert host_class("dane", usable_311, [(address(True), expired)]) == "I"
    trusted = address(True, postfix_tls="Trusted")
    assert host_class("dane", usable_311, [(trusted, DaneMatch("pass", ["2 1 1 ab at depth 1"]))]) == "D'"


# -- domain_verdict -------------------------------------------------------------------------------


def test_domain_verdict_from_hosts() -> None:
    good = host("mx1.d.example", [address(True)])
    stale = host("mx2.d.example", [address(False, "tlsa-mismatch")], failure_class="A")
    assert domain_verdict(lookup(), [good], True, False) == ("ok", None)
    assert domain_verdict(lookup(), [stale], True, False) == ("blocked", "A")
    assert domain_verdict(lookup(), [good, stale], True, False) == ("degraded", "A''")
    assert domain_verdict(lookup(), [good], False, False) == ("unknown", "K")
    bogus = lookup(ad=False, rcode="SERVFAIL", security="bogus")
    assert domain_verdict(bogus, [], True, False) == ("blocked", "F")
    assert domain_verdict(lookup(), [], True, True) == ("blocked", None)  # null MX
    unprobed = host("mx1.d.example", [address(None, "not-probed-reserved", fingerprint="")])
    assert domain_verdict(lookup(), [unprobed], True, False) == ("unknown", None)


def test_one_failing_address_of_a_host_degrades_the_domain() -> None:
    both = host(
        "mx.d.example",
        [address(True), address(False, "tlsa-mismatch", "CC:DD", address="2001:db8::1", family="ipv6")],
        failure_class="A",
    )
    assert domain_verdict(lookup(), [both], True, False) == ("degraded", "A''")


# -- resolver_validates ---------------------------------------------------------------------------


def test_resolver_validates() -> None:
    secure_host = host("mx.d.example", [address(True)])
    answered = lookup(ad=True)
    unvalidated = lookup(ad=False)
    servfail = lookup(ad=False, rcode="SERVFAIL", security="error")
    bogus = lookup(ad=False, rcode="SERVFAIL", security="bogus")
    assert resolver_validates(answered, unvalidated, []) is True
    assert resolver_validates(None, answered, []) is True
    assert resolver_validates(unvalidated, unvalidated, [secure_host]) is True
    assert resolver_validates(unvalidated, unvalidated, []) is False
    assert resolver_validates(None, unvalidated, []) is None
    # A self-test that fails for another reason decides nothing; a bogus answer anywhere is proof.
    assert resolver_validates(servfail, unvalidated, []) is None
    assert resolver_validates(servfail, bogus, []) is True
    assert resolver_validates(bogus, unvalidated, []) is True
    assert resolver_validates(unvalidated, bogus, []) is True
    bogus_tlsa = host("mx.d.example", [address(False, "tlsa-lookup-error")], dnssec="insecure")
    bogus_tlsa = bogus_tlsa.model_copy(update={"tlsa": TlsaResult(state="error", base_domain="mx", lookups=[bogus])})
    assert resolver_validates(servfail, unvalidated, [bogus_tlsa]) is True


# -- recommend ------------------------------------------------------------------------------------


def test_recommend_pins_every_served_key_when_blocked() -> None:
    stale = host(
        "mx.d.example",
        [address(False, "tlsa-mismatch", "AA:BB"), address(False, "tlsa-mismatch", "CC:DD", address="192.0.2.2")],
        failure_class="A",
    )
    recommended, contingency = recommend(DOMAIN, "blocked", "A", [stale])
    assert contingency is None and recommended is not None
    assert (recommended.policy, recommended.parameters) == ("fingerprint", "match=AA:BB|CC:DD")
    assert [o.policy for o in recommended.alternatives] == ["encrypt"]  # verify: no WebPKI names


def test_recommend_for_degraded_is_a_contingency() -> None:
    good = host("mx1.d.example", [address(True, fingerprint="AA:BB")])
    stale = host("mx2.d.example", [address(False, "tlsa-mismatch", "CC:DD")], failure_class="A")
    recommended, contingency = recommend(DOMAIN, "degraded", "A''", [good, stale])
    assert recommended is None and contingency is not None
    assert contingency.parameters == "match=AA:BB|CC:DD"


def test_recommend_may_only_without_starttls() -> None:
    no_starttls = address(False, "starttls-missing", fingerprint="", probe=probe(starttls=False))
    recommended, _ = recommend(DOMAIN, "blocked", "B", [host("mx.d.example", [no_starttls], failure_class="B")])
    assert recommended is not None and (recommended.policy, recommended.plaintext) == ("may", True)


@pytest.mark.parametrize("failure_class", ["F", "K"])
def test_recommend_nothing_when_no_tls_policy_helps(failure_class: Any) -> None:
    stale = host("mx.d.example", [address(False, "tlsa-mismatch")])
    assert recommend(DOMAIN, "blocked", failure_class, [stale]) == (None, None)
    assert recommend(DOMAIN, "ok", None, [host("mx.d.example", [address(True)])]) == (None, None)


# -- plan_addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "limit", "expected"),
    [
        ([["ipv4"], ["ipv4"], ["ipv4"]], 5, [["yes"], ["yes"], ["yes"]]),
        # Six hosts with one address each: the sixth is never tried.
        ([["ipv4"]] * 6, 5, [["yes"]] * 5 + [["no"]]),
        # Seven equal-preference addresses in random order: each one is tried in some deliveries.
        ([["ipv4"] * 7], 5, [["maybe"] * 7]),
        # IPv4/IPv6 balancing: the backup's only IPv4 address survives six IPv6 addresses before it.
        ([["ipv6"] * 6, ["ipv4"]], 5, [["maybe"] * 6, ["yes"]]),
        # Both families above half the limit: the first family gets the odd slot.
        ([["ipv4"] * 3, ["ipv6"] * 3], 5, [["yes"] * 3, ["maybe"] * 3]),
        ([["ipv4", "ipv6"] * 3], 5, [["maybe"] * 6]),
        # smtp_mx_address_limit = 0: no limit.
        ([["ipv4"] * 9], 0, [["yes"] * 9]),
    ],
)
def test_plan_addresses_follows_postfix(groups: list[list[Family]], limit: int, expected: list[list[str]]) -> None:
    assert plan_addresses(groups, limit) == expected
