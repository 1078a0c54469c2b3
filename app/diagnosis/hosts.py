"""What a diagnosis found out about each MX host (the facts the run gathers), and how those facts
become the host's answer: complete, or cut short by the caps or the deadline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.name

from app.diagnosis.certs import DaneMatch
from app.diagnosis.config import DiagnosisConfig
from app.diagnosis.explain import host_advice, host_explanation
from app.diagnosis.models import (
    AddressResult,
    AddressStatus,
    DnsLookup,
    HostStatus,
    MxHost,
    PostfixLevel,
    Security,
    TlsaRecord,
    TlsaResult,
)
from app.diagnosis.resolver import Answer, describe_failure
from app.diagnosis.rules import Family, Tried, any_delivers, host_class, postfix_level


@dataclass
class AddressCheck:
    result: AddressResult
    dane: DaneMatch | None = None


@dataclass
class TlsaFacts:
    result: TlsaResult
    records: list[TlsaRecord] = field(default_factory=list)


@dataclass
class PlannedAddress:
    address: str
    family: Family
    tried: Tried = "yes"
    probe: bool = True


@dataclass
class HostFacts:
    """What is known about one MX host so far; a deadline can stop the run at any step."""

    name: str
    preference: int
    implicit: bool
    beyond_cap: bool = False
    a: Answer | None = None
    aaaa: Answer | None = None
    addresses: list[PlannedAddress] = field(default_factory=list)
    tlsa: TlsaFacts | None = None
    checks: dict[str, AddressCheck] = field(default_factory=dict)


def host_result(host: HostFacts, config: DiagnosisConfig, mx_secure: bool) -> MxHost:
    """The host as far as it got: complete, or cut short by the caps or the deadline."""
    if host.beyond_cap:
        return _unchecked_host(
            host, f"{host.name}: not checked: only the first {config.max_mx_hosts} MX hosts are checked"
        )
    if host.a is None or host.aaaa is None:
        return _unchecked_host(host, f"{host.name}: not checked: {_deadline_text(config)} before its address lookup")
    lookups = [host.a.lookup, host.aaaa.lookup]
    usable = usable_answers(host.a, host.aaaa)
    canonical = name_text(usable[0].canonical_name if usable else host.a.canonical_name)
    if not usable:
        return _host_without_addresses(host, canonical, lookups, mx_secure)
    dnssec = answers_security(usable)
    notes = _family_notes(host.a, host.aaaa)
    unfinished: tuple[str, str] | None = None
    if all(a.tried == "no" for a in host.addresses):
        unfinished = ("not-tried", _NOT_TRIED.format(limit=config.mx_address_limit))
    elif host.tlsa is None:
        unfinished = ("not-checked", f"not checked: {_deadline_text(config)} before its TLSA lookup")
    known = {
        "name": host.name,
        "preference": host.preference,
        "implicit": host.implicit,
        "canonical_name": canonical,
        "dnssec": dnssec,
        "address_lookups": lookups,
    }
    if unfinished is not None:
        status, why = unfinished
        return MxHost(
            **known,
            postfix_level="unknown",
            status=status,
            would_deliver=None,
            explanation=f"{host.name}: {why}",
            addresses=[_pending(a, "unknown", config) for a in host.addresses],
        )
    tlsa = host.tlsa
    assert tlsa is not None  # else the host is unfinished (above)
    level = postfix_level(tlsa.result)
    results = [
        host.checks[a.address].result if a.address in host.checks else _pending(a, level, config)
        for a in host.addresses
    ]
    checks = [host.checks[a.address] for a in host.addresses if a.address in host.checks]
    tried = [r for r in results if r.tried]
    would = any_delivers([r.would_deliver for r in tried])
    failing = next((r for r in tried if r.would_deliver is False), None)
    status = failing.status if failing else tried[0].status
    leaf = next((r.probe.chain[0] for r in tried if r.probe and r.probe.chain), None)
    explanation = host_explanation(host.name, level, tlsa.result, status, tried, mx_secure)
    if notes:
        explanation += f" (note: {'; '.join(notes)})"
    return MxHost(
        **known,
        postfix_level=level,
        tlsa=tlsa.result,
        status=status,
        would_deliver=would,
        failure_class=host_class(level, tlsa.result, [(c.result, c.dane) for c in checks]),
        tlsa_3_1_1=leaf.tlsa_3_1_1 if leaf else None,
        tlsa_3_0_1=leaf.tlsa_3_0_1 if leaf else None,
        pkey_fingerprint=leaf.pkey_fingerprint if leaf else None,
        explanation=explanation,
        advice=host_advice(tlsa.result, [c.result for c in checks], [c.dane for c in checks]),
        addresses=results,
    )


def _pending(planned: PlannedAddress, level: PostfixLevel, config: DiagnosisConfig) -> AddressResult:
    """An address without a probe result: never tried by Postfix, beyond the probe cap, or cut off."""
    if planned.tried == "no":
        status: AddressStatus = "not-tried"
        detail = _NOT_TRIED.format(limit=config.mx_address_limit)
    elif not planned.probe:
        status = "not-probed"
        detail = (
            f"not probed: Postfix tries only {config.mx_address_limit} of this preference's addresses "
            "(in random order), and at most that many are probed per host"
        )
    else:
        status = "not-probed"
        detail = f"not probed: {_deadline_text(config)}"
    if level == "defer" and status == "not-probed":
        # The TLSA lookup failure alone decides Postfix's outcome; the probe was only for overrides.
        return AddressResult(
            address=planned.address,
            family=planned.family,
            status="tlsa-lookup-error",
            would_deliver=False,
            detail=detail,
        )
    return AddressResult(
        address=planned.address, family=planned.family, status=status, would_deliver=None, detail=detail
    )


def _host_without_addresses(host: HostFacts, canonical: str, lookups: list[DnsLookup], mx_secure: bool) -> MxHost:
    failed = [lk for lk in lookups if lk.security in ("bogus", "error")]
    if failed:
        # Postfix uses a host when any address family answers (dns_lookup_rv); here none did. Only
        # a DNSSEC failure is class G ("no TLS policy can help"); a timeout is a temporary failure.
        dnssec: Security = "bogus" if any(lk.security == "bogus" for lk in failed) else "error"
        status: HostStatus = "host-lookup-error"
    else:
        dnssec = "secure" if all(lk.security == "secure" for lk in lookups) else "insecure"
        status = "no-address"
    return MxHost(
        name=host.name,
        preference=host.preference,
        implicit=host.implicit,
        canonical_name=canonical,
        dnssec=dnssec,
        address_lookups=lookups,
        postfix_level="defer" if failed else "may",
        status=status,
        would_deliver=False,
        failure_class="G" if dnssec == "bogus" else None,
        explanation=host_explanation(host.name, "defer", None, status, [], mx_secure, lookups),
    )


def _deadline_text(config: DiagnosisConfig) -> str:
    return f"the diagnosis deadline ({config.diagnosis_deadline:g} s) passed"


def run_notes(facts: Sequence[HostFacts], hosts: Sequence[MxHost], config: DiagnosisConfig) -> list[str]:
    """Caps that left hosts or addresses out, for the domain explanation."""
    notes: list[str] = []
    capped = sum(1 for h in facts if h.beyond_cap)
    if capped:
        notes.append(
            f"Only the first {config.max_mx_hosts} of {len(facts)} MX hosts were checked; "
            f"Postfix tries at most {config.mx_address_limit} addresses per delivery, so it rarely "
            "gets that far."
        )
    not_tried = sum(1 for h in hosts for a in h.addresses if not a.tried)
    if not_tried:
        notes.append(
            f"{not_tried} address{'es' if not_tried != 1 else ''} come after the first "
            f"{config.mx_address_limit} Postfix tries (smtp_mx_address_limit): not probed and not "
            "part of the verdict."
        )
    return notes


_NOT_TRIED = (
    "not tried: Postfix stops after {limit} addresses per delivery (smtp_mx_address_limit), and this one "
    "comes after them"
)


def _unchecked_host(host: HostFacts, explanation: str) -> MxHost:
    return MxHost(
        name=host.name,
        preference=host.preference,
        implicit=host.implicit,
        canonical_name=host.name,
        dnssec="error",
        postfix_level="unknown",
        status="not-checked",
        would_deliver=None,
        explanation=explanation,
    )


def usable_answers(a: Answer, aaaa: Answer) -> list[Answer]:
    """The address answers Postfix uses: any family that returned addresses (dns_lookup_rv returns
    success when one type succeeds). With none, the host has no usable address."""
    return [answer for answer in (a, aaaa) if answer.rrset is not None and answer.security not in ("bogus", "error")]


def answers_security(answers: Sequence[Answer]) -> Security:
    return "secure" if all(answer.security == "secure" for answer in answers) else "insecure"


def _family_notes(a: Answer, aaaa: Answer) -> list[str]:
    notes = []
    for answer, family in ((a, "IPv4"), (aaaa, "IPv6")):
        if answer.security in ("bogus", "error"):
            kind = "fails DNSSEC validation" if answer.security == "bogus" else "failed"
            notes.append(
                f"the {answer.lookup.rdtype} lookup {kind} ({describe_failure(answer.lookup)}), so {family} "
                "is unavailable and Postfix uses the other address family"
            )
    return notes


def name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()
