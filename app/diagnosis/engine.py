"""diagnose(): predict what mailcow's Postfix (`smtp_tls_security_level = dane`) does for a recipient
domain, in Postfix's own order (dane.md §2.1), and which override would fix it (§2.3)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dns.name
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TLSA

from app.diagnosis.certs import DaneMatch, make_tlsa_record, match_dane, pkix_check
from app.diagnosis.config import DiagnosisConfig, normalize_domain
from app.diagnosis.explain import (
    address_detail,
    domain_explanation,
    host_advice,
    host_explanation,
)
from app.diagnosis.models import (
    AddressResult,
    AddressStatus,
    Diagnosis,
    DnsLookup,
    FailureClass,
    HostStatus,
    MxHost,
    PolicyOption,
    PostfixLevel,
    PostfixTls,
    Recommendation,
    Security,
    TlsaRecord,
    TlsaResult,
    Verdict,
)
from app.diagnosis.policy import POLICY_STRENGTH, simulate
from app.diagnosis.resolver import Answer, DnsClient
from app.diagnosis.smtp import ProbeOutcome, probe_smtp

_STALE_CLASSES: frozenset[FailureClass | None] = frozenset({"A", "A'", "H"})
_NO_ROUTE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


async def diagnose(domain: str, config: DiagnosisConfig) -> Diagnosis:
    """Diagnose `domain`'s DANE state as mailcow's Postfix sees it; raises InvalidDomain on bad input."""
    name = normalize_domain(domain)
    started = time.monotonic()
    checked_at = datetime.now(UTC)
    run = _Run(name, config)
    selftest, mx = await asyncio.gather(run.selftest(), run.client.lookup(dns.name.from_text(name), "MX"))
    hosts, implicit, null_mx = await run.check_mx(mx)
    validates: bool | None = None
    if selftest or mx.lookup.ad or any(h.dnssec == "secure" for h in hosts):
        validates = True
    elif selftest is False:
        validates = False
    verdict, failure_class = _verdict(mx.lookup, hosts, validates, null_mx)
    recommended, contingency = _recommend(name, verdict, failure_class, hosts)
    explanation = domain_explanation(
        domain=name,
        verdict=verdict,
        failure_class=failure_class,
        hosts=hosts,
        mx=mx.lookup,
        null_mx=null_mx,
        recommended=recommended,
        contingency=contingency,
        resolver=config.resolver_label,
        resolver_validates=validates,
    )
    return Diagnosis(
        domain=name,
        verdict=verdict,
        failure_class=failure_class,
        recommended=recommended,
        contingency=contingency,
        explanation=explanation,
        resolver=config.resolver_label,
        resolver_validates=validates,
        smtp_port=config.smtp_port,
        mx=mx.lookup,
        implicit_mx=implicit,
        null_mx=null_mx,
        hosts=hosts,
        checked_at=checked_at,
        duration_ms=round((time.monotonic() - started) * 1000),
    )


@dataclass
class _AddressCheck:
    result: AddressResult
    dane: DaneMatch | None = None


@dataclass
class _Tlsa:
    result: TlsaResult
    records: list[TlsaRecord] = field(default_factory=list)


class _Run:
    """One diagnosis: the resolver client, the probe limit, and the domain's facts."""

    def __init__(self, domain: str, config: DiagnosisConfig) -> None:
        self.domain = domain
        self.config = config
        self.client = DnsClient(config.resolver, config.timeout)
        self.probes = asyncio.Semaphore(config.concurrency)
        self.mx_secure = False

    async def selftest(self) -> bool | None:
        """Does the resolver validate? AD=1 on a zone known to be signed (dane.md §2.1 step 0)."""
        answer = await self.client.lookup(dns.name.from_text(self.config.selftest_name), "DNSKEY", show_published=False)
        if answer.rcode == "TIMEOUT":
            return None
        # Any answer without AD (an error, or data the resolver did not validate) means DANE is off.
        return answer.rcode == "NOERROR" and answer.lookup.ad

    async def check_mx(self, mx: Answer) -> tuple[list[MxHost], bool, bool]:
        """(hosts, implicit MX, null MX) from the MX answer (step 1)."""
        if mx.security in ("bogus", "error") or mx.rcode != "NOERROR":
            return [], False, False
        self.mx_secure = mx.security == "secure"
        exchanges: dict[str, int] = {}
        for rdata in mx.rrset or []:
            assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
            target = rdata.exchange.to_text(omit_final_dot=True).lower()
            exchanges[target] = min(rdata.preference, exchanges.get(target, rdata.preference))
        if mx.rrset is not None and ("" in exchanges or "." in exchanges) and len(exchanges) == 1:
            return [], False, True
        implicit = mx.rrset is None
        if implicit:
            exchanges = {self.domain: 0}
        ordered = sorted(exchanges.items(), key=lambda item: (item[1], item[0]))
        hosts = await asyncio.gather(*(self.check_host(host, pref, implicit) for host, pref in ordered if host))
        return list(hosts), implicit, False

    async def check_host(self, host: str, preference: int, implicit: bool) -> MxHost:
        """Steps 2 to 5 for one MX host: addresses, TLSA, probes, match."""
        qname = dns.name.from_text(host)
        a, aaaa = await asyncio.gather(self.client.lookup(qname, "A"), self.client.lookup(qname, "AAAA"))
        lookups = [a.lookup, aaaa.lookup]
        addresses = [rd.to_text() for ans in (a, aaaa) for rd in (ans.rrset or [])]
        canonical = next((ans.canonical_name for ans in (a, aaaa) if ans.rrset is not None), a.canonical_name)
        canonical_text = canonical.to_text(omit_final_dot=True).lower()
        dnssec = _host_security(a, aaaa)
        if dnssec in ("bogus", "error"):
            # A failed address lookup is a temporary failure for the host in Postfix, whatever the other
            # address family returned (dane.md §2.2 row G).
            return self._host_without_addresses(host, preference, implicit, canonical_text, lookups, dnssec, "defer")
        if not addresses:
            return self._host_without_addresses(host, preference, implicit, canonical_text, lookups, dnssec, "may")

        tlsa = await self.check_tlsa(host, canonical, host_secure=dnssec == "secure")
        level = _postfix_level(tlsa.result)
        reference_names = list(dict.fromkeys([self.domain, host, canonical_text, tlsa.result.base_domain]))
        checks = await asyncio.gather(
            *(self.check_address(addr, level, tlsa, reference_names, host, canonical_text) for addr in addresses)
        )
        results = [c.result for c in checks]
        would = _any_delivers([r.would_deliver for r in results])
        failing = next((r for r in results if r.would_deliver is False), None)
        status = failing.status if failing else results[0].status
        host_class = _host_class(level, tlsa, checks)
        leaf = next((r.probe.chain[0] for r in results if r.probe and r.probe.chain), None)
        return MxHost(
            name=host,
            preference=preference,
            implicit=implicit,
            canonical_name=canonical_text,
            dnssec=dnssec,
            address_lookups=lookups,
            postfix_level=level,
            tlsa=tlsa.result,
            status=status,
            would_deliver=would,
            failure_class=host_class,
            tlsa_3_1_1=leaf.tlsa_3_1_1 if leaf else None,
            tlsa_3_0_1=leaf.tlsa_3_0_1 if leaf else None,
            pkey_fingerprint=leaf.pkey_fingerprint if leaf else None,
            explanation=host_explanation(host, level, tlsa.result, status, results, self.mx_secure),
            advice=host_advice(tlsa.result, [c.result for c in checks], [c.dane for c in checks]),
            addresses=results,
        )

    def _host_without_addresses(
        self,
        host: str,
        preference: int,
        implicit: bool,
        canonical: str,
        lookups: list[DnsLookup],
        dnssec: Security,
        level: PostfixLevel,
    ) -> MxHost:
        failed = dnssec in ("bogus", "error")
        status: HostStatus = "host-lookup-error" if failed else "no-address"
        return MxHost(
            name=host,
            preference=preference,
            implicit=implicit,
            canonical_name=canonical,
            dnssec=dnssec,
            address_lookups=lookups,
            postfix_level=level,
            status=status,
            would_deliver=False,
            failure_class="G" if failed else None,
            explanation=host_explanation(host, level, None, status, [], self.mx_secure, lookups),
        )

    async def check_tlsa(self, host: str, canonical: dns.name.Name, *, host_secure: bool) -> _Tlsa:
        """Step 3: `_25._tcp` at the CNAME-expanded name, then at the original name (RFC 7672 §2.2.2)."""
        original = dns.name.from_text(host)
        names = [canonical] if canonical == original else [canonical, original]
        if not host_secure:
            # Postfix does not look for TLSA records of a host in an unsigned zone; we do, to explain.
            answer = await self.client.lookup(_tlsa_name(canonical), "TLSA")
            return _Tlsa(
                TlsaResult(
                    state="not-applicable",
                    base_domain=_text(canonical),
                    records=_records(answer),
                    lookups=[answer.lookup],
                )
            )
        lookups: list[DnsLookup] = []
        saw_insecure = False
        for base in names:
            answer = await self.client.lookup(_tlsa_name(base), "TLSA")
            lookups.append(answer.lookup)
            if answer.security in ("bogus", "error"):
                return _Tlsa(TlsaResult(state="error", base_domain=_text(base), lookups=lookups))
            records = _records(answer)
            if answer.security == "secure" and records:
                state = "usable" if any(r.usable for r in records) else "unusable"
                return _Tlsa(
                    TlsaResult(state=state, base_domain=_text(base), records=records, lookups=lookups), records
                )
            saw_insecure = saw_insecure or (answer.security == "insecure" and bool(records))
        state = "insecure" if saw_insecure else "none"
        return _Tlsa(TlsaResult(state=state, base_domain=_text(names[0]), lookups=lookups))

    async def check_address(
        self,
        address: str,
        level: PostfixLevel,
        tlsa: _Tlsa,
        reference_names: list[str],
        host: str,
        canonical: str,
    ) -> _AddressCheck:
        """Step 4 and 5 for one address: probe (unless refused), then judge like Postfix."""
        ip = ipaddress.ip_address(address)
        family = "ipv6" if ip.version == 6 else "ipv4"
        if not self.config.allow_reserved and (not ip.is_global or ip.is_multicast):
            return _AddressCheck(
                AddressResult(
                    address=address,
                    family=family,
                    status="tlsa-lookup-error" if level == "defer" else "not-probed-reserved",
                    would_deliver=False if level == "defer" else None,
                    detail=f"not probed: {address} is {_reserved_kind(ip)} and allow_reserved is off",
                )
            )
        async with self.probes:
            outcome = await probe_smtp(
                address, self.config.smtp_port, tlsa.result.base_domain, self.config.helo_name, self.config.timeout
            )
        dane: DaneMatch | None = None
        pkix_names: list[str] = []
        pkix_error: str | None = None
        if outcome.chain:
            if level == "dane":
                dane = match_dane(outcome.chain, tlsa.records, reference_names, datetime.now(UTC))
            candidates = [*reference_names, *(outcome.probe.chain[0].dns_names)]
            pkix = await asyncio.to_thread(pkix_check, outcome.chain, candidates, self.config.ca_file)
            pkix_names, pkix_error = pkix.names, pkix.error
        status, would, tls = _judge(level, tlsa.result, outcome, dane, self.mx_secure, family)
        return _AddressCheck(
            AddressResult(
                address=address,
                family=family,
                status=status,
                would_deliver=would,
                postfix_tls=tls,
                detail=address_detail(status, level, tlsa.result, outcome.probe, dane, host),
                matched=dane.matched if dane else [],
                pkix_names=pkix_names,
                pkix_error=pkix_error,
                probe=outcome.probe,
            ),
            dane,
        )


def _judge(
    level: PostfixLevel,
    tlsa: TlsaResult,
    outcome: ProbeOutcome,
    dane: DaneMatch | None,
    mx_secure: bool,
    family: str,
) -> tuple[AddressStatus, bool | None, PostfixTls | None]:
    """Postfix's outcome for one address at the effective level (dane.md §1.1 and §2.2)."""
    probe = outcome.probe
    if level == "defer":
        return "tlsa-lookup-error", False, None
    if probe.failed_stage == "connect":
        if family == "ipv6" and _no_route(probe.error):
            return "not-probed", None, None
        return "unreachable", False, None
    if probe.failed_stage in ("banner", "ehlo"):
        return "smtp-error", False, None
    opportunistic: AddressStatus = "dane-not-applicable" if tlsa.state in ("not-applicable", "insecure") else "no-tlsa"
    if not outcome.tls_ok:
        missing = probe.starttls_offered is False
        if level == "may":
            # Opportunistic TLS: no STARTTLS, or a failed handshake, and Postfix delivers in plaintext.
            return (opportunistic if missing else "handshake-failed"), True, "plaintext"
        return ("starttls-missing" if missing else "handshake-failed"), False, None
    if level == "may":
        return opportunistic, True, "Untrusted"
    if level == "encrypt":
        return "tlsa-unusable", True, "Untrusted"
    assert dane is not None
    if dane.passed:
        return "pass", True, "Verified" if mx_secure else "Trusted"
    return dane.status, False, None


def _postfix_level(tlsa: TlsaResult) -> PostfixLevel:
    if tlsa.state == "error":
        return "defer"
    if tlsa.state == "usable":
        return "dane"
    if tlsa.state == "unusable":
        return "encrypt"
    return "may"


def _host_class(level: PostfixLevel, tlsa: _Tlsa, checks: Sequence[_AddressCheck]) -> FailureClass | None:
    failing = next((c for c in checks if c.result.would_deliver is False), None)
    if failing is not None:
        status = failing.result.status
        if status == "tlsa-lookup-error":
            return "E"
        if status == "starttls-missing":
            return "B"
        if status in ("name-mismatch", "cert-expired", "chain-invalid"):
            return "H"
        if status == "tlsa-mismatch":
            usable = [r for r in tlsa.records if r.usable]
            if not any(r.usage == 3 for r in usable):
                return "H"
            if all(r.usage == 3 and r.selector == 0 for r in usable):
                return "A'"
            return "A"
        return None
    if level == "may":
        return "D" if tlsa.result.state in ("not-applicable", "insecure") else "J"
    if level == "encrypt":
        return "C"
    passing = [c.dane for c in checks if c.dane is not None and c.dane.passed]
    if any(d.leaf_expired or not d.leaf_name_ok for d in passing if d.matched_ee):
        return "I"
    if any(c.result.postfix_tls == "Trusted" for c in checks):
        return "D'"
    return None


def _verdict(
    mx: DnsLookup, hosts: Sequence[MxHost], validates: bool | None, null_mx: bool
) -> tuple[Verdict, FailureClass | None]:
    if validates is False:
        return "unknown", "K"
    if mx.security == "bogus":
        return "blocked", "F"
    if mx.rcode != "NOERROR" or null_mx or not hosts:
        return ("unknown" if mx.rcode == "TIMEOUT" else "blocked"), None
    address_states = [a.would_deliver for h in hosts for a in h.addresses]
    any_address_fails = any(s is False for s in address_states) or any(not h.addresses for h in hosts)
    host_states = [h.would_deliver for h in hosts]
    if all(s is True for s in host_states) and not any_address_fails:
        verdict: Verdict = "ok"
    elif any(s is True for s in host_states) and any_address_fails:
        verdict = "degraded"
    elif all(s is False for s in host_states):
        verdict = "blocked"
    else:
        verdict = "unknown"
    return verdict, _domain_class(verdict, hosts)


def _domain_class(verdict: Verdict, hosts: Sequence[MxHost]) -> FailureClass | None:
    if verdict == "ok":
        return next((h.failure_class for h in hosts if h.failure_class), None)
    failing = [h for h in hosts if h.would_deliver is not True or any(a.would_deliver is False for a in h.addresses)]
    classes = [h.failure_class for h in failing]
    if verdict == "degraded" and classes and all(c in _STALE_CLASSES for c in classes):
        return "A''"
    return next((c for c in classes if c), None)


def _recommend(
    domain: str, verdict: Verdict, failure_class: FailureClass | None, hosts: Sequence[MxHost]
) -> tuple[Recommendation | None, Recommendation | None]:
    """(recommended now, contingency): the strongest override that gets mail to a failing host."""
    if verdict not in ("blocked", "degraded") or failure_class in ("F", "K"):
        return None, None
    best = _best_override(domain, hosts)
    return (best, None) if verdict == "blocked" else (None, best)


def _best_override(domain: str, hosts: Sequence[MxHost]) -> Recommendation | None:
    baseline = simulate("dane", "", domain, hosts)
    failing = {(o.host, o.address) for o in baseline if o.delivers is not True}
    working = {(o.host, o.address) for o in baseline if o.delivers is True}
    options: list[tuple[PolicyOption, bool]] = []
    for option in _candidates(hosts):
        outcome = simulate(option.policy, option.parameters, domain, hosts)
        fixes = any(o.delivers is True for o in outcome if (o.host, o.address) in failing)
        keeps = all(o.delivers is True for o in outcome if (o.host, o.address) in working)
        if fixes:
            plaintext = any(o.plaintext for o in outcome)
            options.append((option.model_copy(update={"plaintext": plaintext}), keeps))
    ranked = [o for o, keeps in options if keeps] or [o for o, _ in options]
    if not ranked:
        return None
    first, rest = ranked[0], ranked[1:]
    return Recommendation(**first.model_dump(), alternatives=rest)


def _candidates(hosts: Sequence[MxHost]) -> list[PolicyOption]:
    fingerprints = list(
        dict.fromkeys(
            a.probe.chain[0].pkey_fingerprint for h in hosts for a in h.addresses if a.probe and a.probe.chain
        )
    )
    options: list[PolicyOption] = []
    if fingerprints:
        options.append(
            PolicyOption(
                policy="fingerprint",
                parameters="match=" + "|".join(fingerprints),
                reason="pins the public key(s) the MX hosts serve now: keeps authentication, and fails safe if "
                "the key changes again; confirm the fingerprints with the recipient if you can",
            )
        )
    options.append(
        PolicyOption(
            policy="verify",
            reason="WebPKI: the certificate chains to a CA in mailcow's bundle and names the MX host",
        )
    )
    options.append(PolicyOption(policy="encrypt", reason="mandatory TLS without authentication"))
    options.append(
        PolicyOption(
            policy="may",
            reason="opportunistic TLS: the only option that delivers when STARTTLS is missing, and then "
            "mail goes to that host in PLAINTEXT",
        )
    )
    return sorted(options, key=lambda o: -POLICY_STRENGTH[o.policy])


def _host_security(a: Answer, aaaa: Answer) -> Security:
    states = [a.security, aaaa.security]
    if "bogus" in states:
        return "bogus"
    if "error" in states:
        return "error"
    return "secure" if all(s == "secure" for s in states) else "insecure"


def _records(answer: Answer) -> list[TlsaRecord]:
    records = []
    for rdata in answer.rrset or []:
        if isinstance(rdata, dns.rdtypes.ANY.TLSA.TLSA):
            records.append(make_tlsa_record(rdata.usage, rdata.selector, rdata.mtype, rdata.cert.hex()))
    return records


def _any_delivers(states: Sequence[bool | None]) -> bool | None:
    if any(s is True for s in states):
        return True
    if states and all(s is False for s in states):
        return False
    return None


def _tlsa_name(base: dns.name.Name) -> dns.name.Name:
    return dns.name.from_text("_25._tcp", origin=base)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _no_route(error: str | None) -> bool:
    text = (error or "").lower()
    return any(word in text for word in ("unreachable", "not available", "address family")) or any(
        f"[errno {n}]" in text for n in _NO_ROUTE_ERRNOS
    )


def _reserved_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for attribute in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(ip, attribute):
            return "a " + attribute.removeprefix("is_").replace("_", "-") + " address"
    return "not a global address"
