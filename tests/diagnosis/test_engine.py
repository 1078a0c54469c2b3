"""app.diagnosis against the real DANE lab (tests/lab), plus the pure workflow helpers."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import dns.name
import pytest

from app.diagnosis import (
    Diagnosis,
    DiagnosisConfig,
    InvalidDomain,
    assess_request,
    diagnose,
    engine,
    is_clean,
    normalize_domain,
)
from app.diagnosis.config import not_global_reason
from app.diagnosis.models import AddressResult, DnsLookup, MxHost, Security, SmtpProbe
from app.diagnosis.resolver import Answer, DnsClient
from app.diagnosis.rules import domain_verdict
from app.diagnosis.smtp import probe_smtp
from app.overrides.postfix import PolicyInputError, normalise_destination, normalise_parameters
from tests.lab.lab import Lab
from tests.lab.topology import SCENARIO_DOMAINS, SELFTEST_SERVFAIL

# domain: (verdict, failure_class, recommended policy, contingency policy) — dane.md §2.2/§2.3
EXPECTED: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "example.test": ("degraded", "A''", None, "fingerprint"),
    "good.example.test": ("ok", None, None, None),
    "stale.example.test": ("blocked", "A", "fingerprint", None),
    "stalefirst.example.test": ("degraded", "A''", None, "fingerprint"),
    "stale301.example.test": ("blocked", "A'", "fingerprint", None),
    "nostarttls.example.test": ("blocked", "B", "may", None),
    "pkix.example.test": ("ok", "C", None, None),
    "ta.example.test": ("ok", None, None, None),
    "taname.example.test": ("blocked", "H", "fingerprint", None),
    "expired.example.test": ("ok", "I", None, None),
    "notlsa.example.test": ("ok", "J", None, None),
    "bogustlsa.example.test": ("blocked", "E", "fingerprint", None),
    "bogushost.example.test": ("blocked", "G", None, None),
    "cname.example.test": ("ok", None, None, None),
    "cnameorig.example.test": ("ok", None, None, None),
    "implicit.example.test": ("ok", None, None, None),
    "nullmx.example.test": ("blocked", None, None, None),
    "unsigned.test": ("ok", "D", None, None),
    "hosted.unsigned.test": ("ok", "D'", None, None),
    "bogus.test": ("blocked", "F", None, None),
    "sni.example.test": ("blocked", "A", "fingerprint", None),
    "many.example.test": ("ok", "I", None, None),  # mx1's certificate names none of many1-5
    "longtlsa.example.test": ("blocked", "E", "fingerprint", None),
    "longertlsa.example.test": ("ok", "J", None, None),
    "badlen.example.test": ("ok", "C", None, None),
    "taexpired.example.test": ("blocked", "H", "fingerprint", None),
    # TLS 1.1 only: no authenticating override works; encrypt with protocols= admitting TLS 1.1 does.
    "legacy.example.test": ("blocked", None, "encrypt", None),
}

# The key each recommended `fingerprint` must pin, by lab server (`:default`: its certificate for
# clients that send no SNI, as Postfix under a fingerprint override).
PINNED_SERVERS = {
    "stale.example.test": ["mx2"],
    "stale301.example.test": ["mx8"],
    "taname.example.test": ["mx10"],
    "bogustlsa.example.test": ["mx7"],
    "sni.example.test": ["mx12:default"],
    "longtlsa.example.test": ["mx6"],
    "taexpired.example.test": ["mx15"],
}


@pytest.fixture(scope="module")
def results(dane_lab: Lab) -> dict[str, Diagnosis]:
    """Every scenario domain diagnosed once, all at the same time."""

    async def run() -> list[Diagnosis]:
        return await asyncio.gather(*(diagnose(domain, dane_lab.config()) for domain in SCENARIO_DOMAINS))

    return {d.domain: d for d in asyncio.run(run())}


def fingerprints(lab: Lab, keys: list[str]) -> str:
    def one(key: str) -> str:
        server, _, variant = key.partition(":")
        return lab.server(server)["default_pkey_fingerprint" if variant == "default" else "pkey_fingerprint"]

    return "match=" + "|".join(one(k) for k in keys)


def test_every_scenario_is_covered() -> None:
    assert set(EXPECTED) == set(SCENARIO_DOMAINS)


# -- verdicts, classes, recommendations ---------------------------------------------------


@pytest.mark.lab
@pytest.mark.parametrize("domain", sorted(EXPECTED))
def test_verdict_class_and_recommendation(results: dict[str, Diagnosis], domain: str) -> None:
    diagnosis = results[domain]
    verdict, failure_class, recommended, contingency = EXPECTED[domain]
    assert (diagnosis.verdict, diagnosis.failure_class) == (verdict, failure_class), diagnosis.explanation
    assert (diagnosis.recommended.policy if diagnosis.recommended else None) == recommended
    assert (diagnosis.contingency.policy if diagnosis.contingency else None) == contingency
    assert diagnosis.resolver_validates is True
    assert diagnosis.explanation


@pytest.mark.lab
@pytest.mark.parametrize("domain", sorted(PINNED_SERVERS))
def test_fingerprint_recommendation_pins_the_served_key(
    results: dict[str, Diagnosis],
    dane_lab: Lab,
    domain: str,
) -> None:
    recommended = results[domain].recommended
    assert recommended is not None
    assert recommended.parameters == fingerprints(dane_lab, PINNED_SERVERS[domain])
    assert recommended.plaintext is False
    # dane.md §2.3: no plaintext-permitting `may` when a TLS-mandatory policy gets the mail through.
    assert [a.policy for a in recommended.alternatives] == ["encrypt"]


@pytest.mark.lab
def test_degraded_contingency_pins_every_host_in_preference_order(
    results: dict[str, Diagnosis],
    dane_lab: Lab,
) -> None:
    example, stalefirst = results["example.test"], results["stalefirst.example.test"]
    assert example.contingency is not None and stalefirst.contingency is not None
    assert example.contingency.parameters == fingerprints(dane_lab, ["mx1", "mx2"])
    assert stalefirst.contingency.parameters == fingerprints(dane_lab, ["mx2", "mx1"])
    assert [h.would_deliver for h in stalefirst.hosts] == [False, True]
    assert "delivers via mx1.example.test" in stalefirst.explanation


@pytest.mark.lab
def test_no_starttls_recommends_may_and_says_plaintext(results: dict[str, Diagnosis]) -> None:
    diagnosis = results["nostarttls.example.test"]
    assert diagnosis.recommended is not None and diagnosis.recommended.plaintext is True
    address = diagnosis.hosts[0].addresses[0]
    assert address.status == "starttls-missing"
    assert address.probe is not None and address.probe.starttls_offered is False
    assert diagnosis.hosts[0].pkey_fingerprint is None
    assert "PLAINTEXT" in diagnosis.recommended.reason
    assert "unencrypted" in diagnosis.explanation


@pytest.mark.lab
def test_a_legacy_tls_host_gets_encrypt_with_protocols(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    diagnosis = results["legacy.example.test"]
    address = diagnosis.hosts[0].addresses[0]
    # The verdict probe negotiates as mailcow's Postfix: TLS 1.2 or later, so the handshake fails.
    assert address.probe is not None and address.probe.protocols == ">=TLSv1.2" and address.probe.security_level == 1
    assert (address.status, address.would_deliver) == ("handshake-failed", False)
    # What the host can do beyond that is reported apart.
    legacy = address.probe_legacy
    assert legacy is not None and (legacy.protocols, legacy.security_level, legacy.sni) == (">=TLSv1", 0, None)
    assert (
        legacy.tls_version == "TLSv1.1"
        and legacy.chain[0].pkey_fingerprint == dane_lab.server("mx16")["pkey_fingerprint"]
    )
    assert "speaks only TLSv1.1" in address.detail and "Cannot start TLS" in address.detail
    recommended = diagnosis.recommended
    assert recommended is not None
    assert (recommended.policy, recommended.parameters, recommended.plaintext) == (
        "encrypt",
        "protocols=>=TLSv1.1",
        False,
    )
    assert "not authenticated" in recommended.reason and "upgrade" in recommended.reason
    # Nothing authenticating works, and plaintext `may` is never offered where encrypt delivers.
    assert recommended.alternatives == []
    # The recommendation is valid Postfix grammar, exactly as the request validation stores it.
    assert normalise_parameters(recommended.parameters, recommended.policy) == recommended.parameters
    assert any("speaks only TLSv1.1" in advice for advice in diagnosis.hosts[0].advice)


@pytest.mark.lab
def test_assess_request_on_a_legacy_tls_host(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    legacy = results["legacy.example.test"]
    assert rules(legacy, "encrypt", "protocols=>=TLSv1.1") == []
    assert rules(legacy, "encrypt", "protocols=>=TLSv1") == []
    bare = assess_request(legacy, "encrypt", "")
    assert [f.rule for f in bare] == ["policy_useless"] and "protocols=>=TLSv1.1" in bare[0].message
    assert rules(legacy, "encrypt", "protocols=>=TLSv1.2") == ["policy_useless"]
    pinned = fingerprints(dane_lab, ["mx16"]) + " protocols=>=TLSv1"
    fingerprint = assess_request(legacy, "fingerprint", pinned)
    assert [f.rule for f in fingerprint] == ["policy_useless"] and "legacy sigalg" in fingerprint[0].message
    assert rules(legacy, "dane", "protocols=>=TLSv1") == ["policy_useless"]
    may = assess_request(legacy, "may", "")
    assert [f.rule for f in may] == ["weaker_than_recommended"] and "plaintext" in may[0].message


@pytest.mark.lab
@pytest.mark.parametrize("domain", SCENARIO_DOMAINS)
def test_every_recommendation_passes_request_validation(results: dict[str, Diagnosis], domain: str) -> None:
    diagnosis = results[domain]
    for best in (diagnosis.recommended, diagnosis.contingency):
        for option in [best, *best.alternatives] if best else []:
            assert normalise_parameters(option.parameters, option.policy) == option.parameters, option


@pytest.mark.lab
def test_bogus_domain_no_tls_policy_can_help(results: dict[str, Diagnosis]) -> None:
    diagnosis = results["bogus.test"]
    assert diagnosis.recommended is None and diagnosis.contingency is None
    assert "No TLS policy can help" in diagnosis.explanation
    assert 'domain-insecure: "bogus.test."' in diagnosis.explanation
    assert diagnosis.hosts == []
    assert diagnosis.mx is not None
    assert diagnosis.mx.rcode == "SERVFAIL" and diagnosis.mx.security == "bogus"
    assert [e.code for e in diagnosis.mx.ede] == [7]
    # What the zone publishes, seen with CD=1.
    assert diagnosis.mx.published == ["10 mx.bogus.test."]


@pytest.mark.lab
def test_bogus_host_address_is_class_g(results: dict[str, Diagnosis]) -> None:
    diagnosis = results["bogushost.example.test"]
    host = diagnosis.hosts[0]
    assert host.status == "host-lookup-error" and host.dnssec == "bogus"
    assert host.addresses == []
    assert "No TLS policy can help" in diagnosis.explanation


@pytest.mark.lab
def test_bogus_tlsa_shows_the_published_records(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    host = results["bogustlsa.example.test"].hosts[0]
    assert host.postfix_level == "defer" and host.tlsa is not None and host.tlsa.state == "error"
    lookup = host.tlsa.lookups[0]
    assert lookup.qname == "_25._tcp.mx7.example.test" and lookup.rcode == "SERVFAIL"
    assert [e.code for e in lookup.ede] == [6]
    assert lookup.published is not None and len(lookup.published) == 1
    assert lookup.published[0].startswith("3 1 1 ")
    # Changed after signing: what is published is not the served key.
    assert lookup.published[0].split()[-1].lower() != dane_lab.server("mx7")["tlsa_3_1_1"]
    # The probe still ran, so the override can pin the served key.
    assert host.pkey_fingerprint == dane_lab.server("mx7")["pkey_fingerprint"]


# -- per-host facts -------------------------------------------------------------------------


@pytest.mark.lab
def test_served_leaf_digests_match_the_lab_certificates(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    by_host = {s["host"]: s for s in dane_lab.servers.values()}
    checked = 0
    for diagnosis in results.values():
        for host in diagnosis.hosts:
            if host.pkey_fingerprint is None:
                continue
            address = host.addresses[0].address
            served = next(s for s in dane_lab.servers.values() if s["address"] == address)
            assert host.tlsa_3_1_1 == served["tlsa_3_1_1"]
            assert host.tlsa_3_0_1 == served["tlsa_3_0_1"]
            assert host.pkey_fingerprint == served["pkey_fingerprint"]
            assert host.pkey_fingerprint.replace(":", "").lower() == host.tlsa_3_1_1
            checked += 1
    assert checked >= 15 and by_host


@pytest.mark.lab
def test_rollover_ready_host(results: dict[str, Diagnosis]) -> None:
    host = results["good.example.test"].hosts[0]
    assert host.tlsa is not None and host.tlsa.state == "usable"
    assert len([r for r in host.tlsa.records if r.usable]) == 2
    assert host.addresses[0].matched == [f"3 1 1 {host.tlsa_3_1_1[:16]}… at depth 0"]
    assert host.addresses[0].postfix_tls == "Verified"
    assert not any("rollover" in advice for advice in host.advice)
    assert host.addresses[0].probe is not None
    assert host.addresses[0].probe.tls_version in ("TLSv1.2", "TLSv1.3")
    assert host.addresses[0].probe.sni == "mx1.example.test"


@pytest.mark.lab
def test_stale_hosts_get_advice(results: dict[str, Diagnosis]) -> None:
    stale = results["stale.example.test"].hosts[0]
    assert f"`3 1 1 {stale.tlsa_3_1_1}`" in " ".join(stale.advice)
    assert any("rollover" in advice for advice in stale.advice)
    stale301 = results["stale301.example.test"].hosts[0]
    assert any("3 0 1" in advice for advice in stale301.advice)


@pytest.mark.lab
def test_a_pinned_certificate_failure_says_the_certificate_was_reissued(results: dict[str, Diagnosis]) -> None:
    # mx8 serves a new certificate for the same key; the `3 0 1` record pins the previous one.
    host = results["stale301.example.test"].hosts[0]
    detail = host.addresses[0].detail
    assert "re-issued" in detail and f"3 0 1 {host.tlsa_3_0_1}" in detail
    assert "served key" not in detail and "served key" not in " ".join(host.advice)
    assert any(f"3 1 1 {host.tlsa_3_1_1}" in advice and "re-issue" in advice for advice in host.advice)
    # A changed key is still called one.
    stale = results["stale.example.test"].hosts[0]
    assert "served key" in stale.addresses[0].detail and "re-issued" not in stale.addresses[0].detail


@pytest.mark.lab
def test_dane_ta_matches_the_issuer_and_checks_the_name(results: dict[str, Diagnosis]) -> None:
    ta = results["ta.example.test"].hosts[0].addresses[0]
    assert ta.status == "pass" and ta.matched[0].startswith("2 1 1 ") and ta.matched[0].endswith("at depth 1")
    assert ta.probe is not None and len(ta.probe.chain) == 2
    assert ta.probe.chain[1].subject == "CN=tlsoverride lab CA"
    taname = results["taname.example.test"].hosts[0].addresses[0]
    assert taname.status == "name-mismatch"
    assert "other.invalid" in taname.detail


@pytest.mark.lab
def test_cname_rule(results: dict[str, Diagnosis]) -> None:
    expanded = results["cname.example.test"].hosts[0]
    assert expanded.name == "mxalias.example.test" and expanded.canonical_name == "mx1.example.test"
    assert expanded.tlsa is not None and expanded.tlsa.base_domain == "mx1.example.test"
    assert expanded.address_lookups[0].cnames == ["mxalias.example.test -> mx1.example.test"]
    original = results["cnameorig.example.test"].hosts[0]
    assert original.tlsa is not None and original.tlsa.base_domain == "mxalias2.example.test"
    assert [lk.qname for lk in original.tlsa.lookups] == ["_25._tcp.mx6.example.test", "_25._tcp.mxalias2.example.test"]


@pytest.mark.lab
def test_insecure_and_unusable_cases(results: dict[str, Diagnosis]) -> None:
    unsigned = results["unsigned.test"].hosts[0]
    assert unsigned.dnssec == "insecure" and unsigned.postfix_level == "may"
    assert unsigned.tlsa is not None and unsigned.tlsa.state == "not-applicable" and unsigned.tlsa.records
    assert any("not DNSSEC-signed" in advice for advice in unsigned.advice)
    hosted = results["hosted.unsigned.test"]
    assert hosted.mx is not None and hosted.mx.security == "insecure"
    assert hosted.hosts[0].addresses[0].postfix_tls == "Trusted"
    pkix = results["pkix.example.test"].hosts[0]
    assert pkix.postfix_level == "encrypt" and pkix.tlsa is not None
    assert sorted(r.text.split()[0] for r in pkix.tlsa.records) == ["0", "1"]
    assert not any(r.usable for r in pkix.tlsa.records)
    notlsa = results["notlsa.example.test"].hosts[0]
    assert notlsa.tlsa is not None and notlsa.tlsa.state == "none"
    assert notlsa.tlsa.lookups[0].security == "secure" and notlsa.tlsa.lookups[0].rcode == "NXDOMAIN"


@pytest.mark.lab
def test_implicit_and_null_mx(results: dict[str, Diagnosis]) -> None:
    implicit = results["implicit.example.test"]
    assert implicit.implicit_mx and implicit.hosts[0].name == "implicit.example.test" and implicit.hosts[0].implicit
    nullmx = results["nullmx.example.test"]
    assert nullmx.null_mx and nullmx.hosts == [] and "null MX" in nullmx.explanation


@pytest.mark.lab
def test_diagnosis_is_json_stable(results: dict[str, Diagnosis]) -> None:
    for diagnosis in results.values():
        assert Diagnosis.model_validate_json(diagnosis.model_dump_json()) == diagnosis
        assert diagnosis.checked_at.tzinfo is not None and diagnosis.checked_at <= datetime.now(UTC)
        assert diagnosis.duration_ms >= 0 and diagnosis.schema_version == 1


# -- configuration -------------------------------------------------------------------------


@pytest.mark.lab
async def test_smtp_port_never_changes_the_tlsa_name(dane_lab: Lab) -> None:
    assert dane_lab.smtp_port != 25
    diagnosis = await diagnose("good.example.test", dane_lab.config())
    host = diagnosis.hosts[0]
    assert host.tlsa is not None and [lk.qname for lk in host.tlsa.lookups] == ["_25._tcp.mx1.example.test"]
    assert host.addresses[0].probe is not None and host.addresses[0].probe.port == dane_lab.smtp_port


@pytest.mark.lab
async def test_reserved_addresses_are_refused_by_default(dane_lab: Lab) -> None:
    diagnosis = await diagnose("good.example.test", dane_lab.config(allow_reserved=False))
    address = diagnosis.hosts[0].addresses[0]
    assert address.status == "not-probed-reserved" and address.probe is None and address.would_deliver is None
    assert "loopback" in address.detail and "allow_reserved" in address.detail
    assert diagnosis.verdict == "unknown" and not is_clean(diagnosis)
    # A TLSA lookup failure is known without probing; which override helps is not.
    bogustlsa = await diagnose("bogustlsa.example.test", dane_lab.config(allow_reserved=False))
    assert (bogustlsa.verdict, bogustlsa.failure_class, bogustlsa.recommended) == ("blocked", "E", None)
    assert "could not be probed" in bogustlsa.explanation


@pytest.mark.lab
async def test_unreachable_hosts_are_not_a_tls_matter(dane_lab: Lab) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    diagnosis = await diagnose("good.example.test", dane_lab.config(smtp_port=closed_port, timeout=1.0))
    assert diagnosis.hosts[0].addresses[0].status == "unreachable"
    assert (diagnosis.verdict, diagnosis.failure_class, diagnosis.recommended) == ("blocked", None, None)


@pytest.mark.lab
async def test_non_validating_resolver_is_class_k(dane_lab: Lab) -> None:
    # NSD is authoritative only: it answers, but never sets AD.
    diagnosis = await diagnose("good.example.test", dane_lab.config(resolver=f"127.0.0.1:{dane_lab.auth_port}"))
    assert diagnosis.resolver_validates is False
    assert (diagnosis.verdict, diagnosis.failure_class, diagnosis.recommended) == ("unknown", "K", None)
    assert "does not validate" in diagnosis.explanation
    assert not is_clean(diagnosis)
    # Our blind spot is not the recipient's problem: flagged as inconclusive, never refused.
    assert [f.rule for f in assess_request(diagnosis, "encrypt", "")] == ["diagnosis_inconclusive"]


@pytest.mark.lab
async def test_a_failing_self_test_is_undecided_and_a_bogus_answer_proves_validation(dane_lab: Lab) -> None:
    # The self-test name answers SERVFAIL for a reason that has nothing to do with DNSSEC (its server
    # refuses the zone). That decides nothing; a bogus answer elsewhere proves the resolver validates.
    lame = dane_lab.config(selftest_name=SELFTEST_SERVFAIL)
    bogus = await diagnose("bogus.test", lame)
    assert bogus.selftest is not None and bogus.selftest.rcode == "SERVFAIL" and bogus.selftest.security == "error"
    # EDE 7 (signature expired) on a fresh answer, 6 (DNSSEC bogus) from Unbound's cache.
    assert bogus.mx is not None and bogus.mx.security == "bogus" and [e.code for e in bogus.mx.ede] in ([7], [6])
    assert bogus.resolver_validates is True
    assert (bogus.verdict, bogus.failure_class, bogus.recommended) == ("blocked", "F", None)
    assert "does not validate" not in bogus.explanation and "No TLS policy can help" in bogus.explanation
    for policy in ("none", "may", "encrypt", "fingerprint", "verify", "dane"):
        assert rules(bogus, policy) == ["policy_useless"], policy
    # The same without Extended DNS Errors (mailcow's unbound): the CD=1 answer is the proof.
    plain = await diagnose(
        "bogus.test", dane_lab.config(selftest_name=SELFTEST_SERVFAIL, resolver=dane_lab.resolver_without_ede)
    )
    assert (plain.resolver_validates, plain.verdict, plain.failure_class) == (True, "blocked", "F")
    # AD=1 on any answer is proof too.
    good = await diagnose("good.example.test", lame)
    assert (good.resolver_validates, good.verdict) == (True, "ok")
    # Nothing proves it for an unsigned domain: undecided, said so, never "does not validate".
    unsigned = await diagnose("unsigned.test", lame)
    assert unsigned.resolver_validates is None and unsigned.failure_class != "K"
    assert "could not be confirmed" in unsigned.explanation and "SERVFAIL" in unsigned.explanation
    assert not is_clean(unsigned)


@pytest.mark.lab
async def test_a_bogus_self_test_name_proves_validation(dane_lab: Lab) -> None:
    diagnosis = await diagnose("unsigned.test", dane_lab.config(selftest_name="bogus.test."))
    assert diagnosis.selftest is not None and diagnosis.selftest.security == "bogus"
    assert diagnosis.resolver_validates is True


@pytest.mark.lab
async def test_input_is_normalised(dane_lab: Lab) -> None:
    diagnosis = await diagnose(" GOOD.Example.TEST. ", dane_lab.config())
    assert diagnosis.domain == "good.example.test" and diagnosis.verdict == "ok"
    missing = await diagnose("bücher.test", dane_lab.config())
    assert missing.domain == "xn--bcher-kva.test"
    assert missing.mx is not None and missing.mx.rcode == "NXDOMAIN" and missing.mx.security == "secure"
    assert (missing.verdict, missing.failure_class, missing.recommended) == ("blocked", None, None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "localhost",
        "a..b.test",
        "-bad.test",
        "under_score.test",
        "user@example.test",
        "192.0.2.1",
        "x" * 64 + ".test",
        "*.example.test",
        "[::1]",
        "a b.test",
        # A-labels that are not punycode of a valid IDNA label: refused before any lookup.
        "xn--zz.example",
        "mx.XN--ZZ.example",
        "xn--a.example",
        "xn--ls8h.example",
    ],
)
async def test_garbage_domains_are_rejected(value: str) -> None:
    with pytest.raises(InvalidDomain):
        await diagnose(value, DiagnosisConfig(resolver="127.0.0.1:9"))
    assert issubclass(InvalidDomain, ValueError)


def test_normalize_domain() -> None:
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_domain("XN--BCHER-KVA.example") == "xn--bcher-kva.example"
    assert normalize_domain("xn--strae-oqa.example") == "xn--strae-oqa.example"
    with pytest.raises(InvalidDomain, match="A-label"):
        normalize_domain("xn--zz.example")


@pytest.mark.parametrize("value", ["xn--zz.example", "mx.xn--zz.example", "xn--a.example", "xn--bcher-kva.example"])
def test_a_labels_are_judged_alike_for_diagnosis_and_requests(value: str) -> None:
    # The diagnostics endpoint and a request's destination accept and refuse the same A-labels.
    try:
        expected: str | None = normalise_destination(value)
    except PolicyInputError:
        expected = None
    try:
        ours: str | None = normalize_domain(value)
    except InvalidDomain:
        ours = None
    assert ours == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolver": "resolver.example:53"},
        {"resolver": "127.0.0.1:0"},
        {"smtp_port": 0},
        {"timeout": 0},
        {"concurrency": 0},
    ],
)
def test_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DiagnosisConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_ipv6_resolver() -> None:
    assert DiagnosisConfig(resolver="[::1]:5301").resolver == "[::1]:5301"


# -- assess_request / is_clean ---------------------------------------------------------------


def rules(diagnosis: Diagnosis, policy: str, parameters: str = "") -> list[str]:
    return sorted(f.rule for f in assess_request(diagnosis, policy, parameters))


@pytest.mark.lab
def test_assess_request_on_a_passing_domain(results: dict[str, Diagnosis]) -> None:
    assert rules(results["good.example.test"], "encrypt") == ["domain_passes"]
    # dane-only on a domain without TLSA records would stop mail that flows today.
    assert rules(results["notlsa.example.test"], "dane-only") == ["domain_passes", "policy_useless"]
    assert rules(results["pkix.example.test"], "dane-only") == ["domain_passes", "policy_useless"]
    finding = assess_request(results["good.example.test"], "may", "")[0]
    assert finding.severity == "warning" and "no override is needed" in finding.message


@pytest.mark.lab
def test_assess_request_on_stale_tlsa(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    stale = results["stale.example.test"]
    assert rules(stale, "fingerprint", fingerprints(dane_lab, ["mx2"])) == []
    assert rules(stale, "fingerprint", "match=00:11:22") == ["policy_useless"]
    assert rules(stale, "encrypt") == ["weaker_than_recommended"]
    may = assess_request(stale, "may", "")
    assert [f.rule for f in may] == ["weaker_than_recommended"] and "plaintext" in may[0].message
    assert rules(stale, "dane") == ["policy_useless", "weaker_than_recommended"]
    assert rules(stale, "verify") == ["policy_useless", "weaker_than_recommended"]  # self-signed: no WebPKI
    assert [f.severity for f in assess_request(stale, "dane", "")] == ["error", "warning"]


@pytest.mark.lab
def test_assess_request_without_starttls(results: dict[str, Diagnosis]) -> None:
    nostarttls = results["nostarttls.example.test"]
    for policy in ("encrypt", "dane", "dane-only", "fingerprint", "verify"):
        assert "policy_useless" in rules(nostarttls, policy), policy
    assert "STARTTLS" in assess_request(nostarttls, "encrypt", "")[0].message
    assert rules(nostarttls, "may") == []
    assert rules(nostarttls, "none") == ["weaker_than_recommended"]


@pytest.mark.lab
def test_assess_request_when_no_tls_policy_helps(results: dict[str, Diagnosis]) -> None:
    for policy in ("none", "may", "encrypt", "fingerprint"):
        assert rules(results["bogus.test"], policy) == ["policy_useless"]
        assert rules(results["bogushost.example.test"], policy) == ["policy_useless"]
    assert "no TLS policy can help" in assess_request(results["bogus.test"], "may", "")[0].message


@pytest.mark.lab
def test_assess_request_on_bogus_tlsa_and_degraded(results: dict[str, Diagnosis]) -> None:
    bogustlsa = results["bogustlsa.example.test"]
    assert rules(bogustlsa, "dane-only") == ["policy_useless", "weaker_than_recommended"]
    assert rules(bogustlsa, "encrypt") == ["weaker_than_recommended"]
    example = results["example.test"]
    assert example.contingency is not None
    assert rules(example, "fingerprint", example.contingency.parameters) == []
    assert rules(example, "encrypt") == ["weaker_than_recommended"]


def test_assess_request_rejects_unknown_policies() -> None:
    diagnosis = Diagnosis(
        domain="example.org",
        verdict="ok",
        failure_class=None,
        recommended=None,
        explanation="",
        resolver="system",
        resolver_validates=True,
        smtp_port=25,
        mx=None,
        hosts=[],
        checked_at=datetime.now(UTC),
        duration_ms=0,
    )
    with pytest.raises(ValueError, match="unknown TLS policy"):
        assess_request(diagnosis, "tls-please", "")


@pytest.mark.lab
def test_is_clean(results: dict[str, Diagnosis]) -> None:
    clean = {domain for domain, diagnosis in results.items() if is_clean(diagnosis)}
    assert clean == {domain for domain, (verdict, *_) in EXPECTED.items() if verdict == "ok"}


# -- DNSSEC-bogus without Extended DNS Errors (mailcow's unbound) ----------------------------


@pytest.mark.lab
@pytest.mark.parametrize(
    ("domain", "failure_class"),
    [("bogus.test", "F"), ("bogushost.example.test", "G"), ("bogustlsa.example.test", "E")],
)
async def test_bogus_is_recognised_without_extended_dns_errors(dane_lab: Lab, domain: str, failure_class: str) -> None:
    # mailcow's unbound.conf has no `ede: yes`: a SERVFAIL that the same query with CD=1 answers is bogus.
    diagnosis = await diagnose(domain, dane_lab.config(resolver=dane_lab.resolver_without_ede))
    assert (diagnosis.verdict, diagnosis.failure_class) == ("blocked", failure_class), diagnosis.explanation
    assert diagnosis.mx is not None
    lookups = [diagnosis.mx]
    for host in diagnosis.hosts:
        lookups += [*host.address_lookups, *(host.tlsa.lookups if host.tlsa else [])]
    failed = [lookup for lookup in lookups if lookup.rcode == "SERVFAIL"]
    assert failed
    for lookup in failed:
        assert lookup.ede == [] and lookup.security == "bogus" and "CD=1" in (lookup.error or "")
    if failure_class in ("F", "G"):
        assert "No TLS policy can help" in diagnosis.explanation


# -- deadlines and caps ------------------------------------------------------------------------


@pytest.mark.lab
async def test_a_dripping_server_cannot_hold_a_probe(dane_lab: Lab) -> None:
    # mxdrip sends a `220-` line every 0.1 s: each line is well inside the 0.5 s step timeout.
    started = time.monotonic()
    diagnosis = await diagnose("drip.example.test", dane_lab.config(timeout=0.5))
    assert time.monotonic() - started < 3
    address = diagnosis.hosts[0].addresses[0]
    assert address.probe is not None and address.probe.failed_stage == "banner"
    assert "deadline of 1 s" in (address.probe.error or "")
    assert (address.status, diagnosis.verdict) == ("smtp-error", "blocked")


@pytest.mark.lab
async def test_the_diagnosis_deadline_gives_unknown_with_what_finished(dane_lab: Lab) -> None:
    started = time.monotonic()
    diagnosis = await diagnose("slowpair.example.test", dane_lab.config(timeout=1.0, deadline=0.8))
    assert time.monotonic() - started < 2
    assert (diagnosis.verdict, diagnosis.failure_class) == ("unknown", None)
    assert diagnosis.recommended is None and diagnosis.contingency is None
    assert "deadline of 0.8 s" in diagnosis.explanation
    mx1, drip = diagnosis.hosts
    assert (mx1.name, mx1.status, mx1.would_deliver) == ("mx1.example.test", "pass", True)
    assert mx1.explanation in diagnosis.explanation
    assert drip.would_deliver is None and drip.addresses[0].status == "not-probed"
    assert "deadline" in drip.addresses[0].detail
    assert not is_clean(diagnosis)
    assert [f.rule for f in assess_request(diagnosis, "encrypt", "")] == ["diagnosis_inconclusive"]


@pytest.mark.lab
def test_only_the_addresses_postfix_tries_count(results: dict[str, Diagnosis]) -> None:
    # many1-5 pass; many6-12 serve a stale key, but Postfix stops after 5 addresses.
    many = results["many.example.test"]
    assert [h.status for h in many.hosts] == ["pass"] * 5 + ["not-tried"] * 5 + ["not-checked"] * 2
    assert [a.status for h in many.hosts[5:10] for a in h.addresses] == ["not-tried"] * 5
    assert all(a.probe is None for h in many.hosts[5:] for a in h.addresses)
    assert many.hosts[10].addresses == [] and "first 10 MX hosts" in many.hosts[10].explanation
    assert "smtp_mx_address_limit" in many.explanation
    assert is_clean(many)
    assert rules(many, "encrypt") == ["domain_passes"]


@pytest.mark.lab
async def test_queries_and_probes_share_the_concurrency_limit(dane_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight = peak = 0

    def counted(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await original(*args, **kwargs)
            finally:
                in_flight -= 1

        return wrapper

    monkeypatch.setattr(DnsClient, "_exchange_now", counted(DnsClient._exchange_now))
    monkeypatch.setattr(engine, "probe_smtp", counted(engine.probe_smtp))
    diagnosis = await diagnose("many.example.test", dane_lab.config(concurrency=2))
    assert diagnosis.verdict == "ok"
    assert peak == 2


# -- odd names ---------------------------------------------------------------------------------


@pytest.mark.lab
def test_tlsa_names_longer_than_dns_allows(results: dict[str, Diagnosis]) -> None:
    # Postfix (posttls-finger in tests/diagnosis/test_postfix.py agrees): 254 characters pass its name check
    # but cannot be sent (TLSA lookup error); 259 are refused as an invalid name (no TLSA records).
    long = results["longtlsa.example.test"].hosts[0]
    assert long.tlsa is not None and long.tlsa.state == "error" and long.postfix_level == "defer"
    assert long.tlsa.lookups[0].rcode == "NAME-TOO-LONG" and "too long" in (long.tlsa.lookups[0].error or "")
    longer = results["longertlsa.example.test"].hosts[0]
    assert longer.tlsa is not None and longer.tlsa.state == "none" and longer.postfix_level == "may"
    assert "invalid name" in (longer.tlsa.lookups[0].error or "")


async def test_an_unencodable_sni_name_is_a_handshake_failure() -> None:
    async def starttls_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stub\r\n")
        await reader.readline()
        writer.write(b"250-stub\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 go ahead\r\n")
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(starttls_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # What dnspython makes of a 20-octet binary label: 80 characters, too long for IDNA.
        outcome = await probe_smtp("127.0.0.1", port, "\\255" * 20 + ".example.test", "h.invalid", 2.0, 4.0)
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.probe.failed_stage == "handshake" and "SNI" in (outcome.probe.error or "")
    assert outcome.chain == []


# -- SNI: what Postfix sends at each level -----------------------------------------------------


@pytest.mark.lab
def test_override_advice_uses_the_certificate_served_without_sni(results: dict[str, Diagnosis], dane_lab: Lab) -> None:
    address = results["sni.example.test"].hosts[0].addresses[0]
    assert address.probe is not None and address.probe.sni == "mx12.example.test"
    assert address.probe.chain[0].pkey_fingerprint == dane_lab.server("mx12")["pkey_fingerprint"]
    # Under a fingerprint override Postfix sends no SNI (mailcow sets no servername=).
    assert address.probe_without_sni is not None and address.probe_without_sni.sni is None
    default = dane_lab.server("mx12")["default_pkey_fingerprint"]
    assert address.probe_without_sni.chain[0].pkey_fingerprint == default
    # At the may level Postfix sends no SNI either, so neither does the one probe.
    notlsa = results["notlsa.example.test"].hosts[0].addresses[0]
    assert notlsa.probe is not None and notlsa.probe.sni is None and notlsa.probe_without_sni is None


# -- DANE-TA anchor dates, digest lengths --------------------------------------------------------


@pytest.mark.lab
def test_an_expired_dane_ta_anchor_fails(results: dict[str, Diagnosis]) -> None:
    address = results["taexpired.example.test"].hosts[0].addresses[0]
    assert address.status == "cert-expired" and "depth 1" in address.detail
    assert address.matched and address.matched[0].startswith("2 1 1 ")


@pytest.mark.lab
def test_a_digest_of_the_wrong_length_is_unusable(results: dict[str, Diagnosis]) -> None:
    host = results["badlen.example.test"].hosts[0]
    assert host.tlsa is not None and host.tlsa.state == "unusable" and host.postfix_level == "encrypt"
    (record,) = host.tlsa.records
    assert (record.mtype, len(record.data), record.usable) == (1, 62, False)


# -- is_clean, reserved addresses, one failing address family ----------------------------------


def _diagnosis_with(addresses: list[AddressResult]) -> Diagnosis:
    lookup = DnsLookup(
        qname="d.example", rdtype="MX", rcode="NOERROR", ad=True, security="secure", canonical_name="d.example"
    )
    host = MxHost(
        name="mx.d.example",
        preference=10,
        canonical_name="mx.d.example",
        dnssec="secure",
        postfix_level="dane",
        status="pass",
        would_deliver=True,
        explanation="",
        addresses=addresses,
    )
    verdict, failure_class = domain_verdict(lookup, [host], True, False)
    return Diagnosis(
        domain="d.example",
        verdict=verdict,
        failure_class=failure_class,
        recommended=None,
        explanation="",
        resolver="x",
        resolver_validates=True,
        smtp_port=25,
        mx=lookup,
        hosts=[host],
        checked_at=datetime.now(UTC),
        duration_ms=1,
    )


def test_unprobed_addresses_beside_a_passing_one_are_clean() -> None:
    passing = AddressResult(
        address="192.0.2.1",
        family="ipv4",
        status="pass",
        would_deliver=True,
        detail="",
        probe=SmtpProbe(port=25, sni="mx.d.example"),
    )
    no_route = AddressResult(
        address="2001:db8::1",
        family="ipv6",
        status="not-probed",
        would_deliver=None,
        detail="no route",
        probe=SmtpProbe(
            port=25, sni="mx.d.example", failed_stage="connect", error="[Errno 101] Network is unreachable"
        ),
    )
    reserved = no_route.model_copy(update={"status": "not-probed-reserved", "probe": None})
    assert is_clean(_diagnosis_with([passing, no_route]))
    assert is_clean(_diagnosis_with([passing, reserved]))
    # Alone, an unprobed address proves nothing.
    assert not is_clean(_diagnosis_with([no_route]))


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::808:808", True),  # local-use NAT64 prefix
        ("2002:7f00:1::1", True),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", True),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", False),
        ("::127.0.0.1", True),  # IPv4-compatible
        ("::ffff:10.0.0.1", True),  # IPv4-mapped
        ("::ffff:8.8.8.8", False),
    ],
)
def test_reserved_addresses_embedded_in_ipv6(address: str, refused: bool) -> None:
    assert (not_global_reason(ipaddress.ip_address(address)) is not None) == refused


@pytest.mark.parametrize(
    ("address", "named"),
    [
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("0.1.2.3", "a 'this network' address (0.0.0.0/8)"),
        ("::ffff:127.0.0.1", "an IPv4-mapped IPv6 address of 127.0.0.1, a loopback address"),
        ("::ffff:0.0.0.0", "an IPv4-mapped IPv6 address of 0.0.0.0, the unspecified address"),
        ("::1", "the loopback address"),
        ("127.0.0.5", "a loopback address"),
        ("10.1.2.3", "a private address (RFC 1918)"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("fd00::1", "a unique local address (fc00::/7)"),
        ("192.0.2.1", "a documentation address"),
        ("2001:db8::1", "a documentation address"),
        ("100.64.0.1", "a shared address (carrier-grade NAT, 100.64.0.0/10)"),
        ("255.255.255.255", "the broadcast address"),
        ("224.0.0.1", "a multicast address"),
        ("64:ff9b::7f00:1", "an IPv6 address embedding 127.0.0.1, a loopback address"),
    ],
)
def test_reserved_addresses_are_named_for_what_they_are(address: str, named: str) -> None:
    assert not_global_reason(ipaddress.ip_address(address)) == named


def _failing(rdtype: str, security: Security) -> Callable[..., Awaitable[Answer]]:
    original = DnsClient.lookup

    async def lookup(self: DnsClient, name: dns.name.Name, kind: str, **kwargs: Any) -> Answer:
        answer = await original(self, name, kind, **kwargs)
        if kind in rdtype.split("+") and name == dns.name.from_text("mx1.example.test"):
            failed = answer.lookup.model_copy(
                update={
                    "rcode": "TIMEOUT" if security == "error" else "SERVFAIL",
                    "ad": False,
                    "security": security,
                    "answers": [],
                    "error": "injected failure",
                }
            )
            return Answer(failed, None, name)
        return answer

    return lookup


@pytest.mark.lab
@pytest.mark.parametrize("security", ["error", "bogus"])
async def test_one_failing_address_family_leaves_the_other(
    dane_lab: Lab, monkeypatch: pytest.MonkeyPatch, security: Security
) -> None:
    # Postfix uses a host when any address family answers (dns_lookup_rv); only IPv6 is lost.
    monkeypatch.setattr(DnsClient, "lookup", _failing("AAAA", security))
    diagnosis = await diagnose("good.example.test", dane_lab.config())
    host = diagnosis.hosts[0]
    assert (diagnosis.verdict, diagnosis.failure_class, host.failure_class) == ("ok", None, None)
    assert host.status == "pass" and host.dnssec == "secure"
    assert "IPv6 is unavailable" in host.explanation


@pytest.mark.lab
async def test_an_address_lookup_timeout_is_not_class_g(dane_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DnsClient, "lookup", _failing("A+AAAA", "error"))
    diagnosis = await diagnose("good.example.test", dane_lab.config())
    host = diagnosis.hosts[0]
    assert (diagnosis.verdict, diagnosis.failure_class) == ("blocked", None)
    assert host.status == "host-lookup-error" and host.failure_class is None
    assert "No TLS policy can help" not in diagnosis.explanation
