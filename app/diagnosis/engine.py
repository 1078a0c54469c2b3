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
from typing import Literal

import dns.name
import dns.rdtypes.ANY.MX

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
from app.diagnosis.resolver import Answer, DnsClient, describe_failure, tlsa_fields
from app.diagnosis.smtp import ProbeOutcome, probe_smtp

_STALE_CLASSES: frozenset[FailureClass | None] = frozenset({"A", "A'", "H"})
_NO_ROUTE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})
# Postfix sends SNI (the TLSA base domain) only when it starts at the dane level; that includes
# `encrypt` reached from all-unusable TLSA records, which falls back after SNI is set (tls_client.c).
_SNI_LEVELS: frozenset[PostfixLevel] = frozenset({"dane", "encrypt"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Postfix's valid_hostname() limit: a longer TLSA query name is "not found", never sent (dns_lookup.c).
_VALID_HOSTNAME_LEN = 255

Family = Literal["ipv4", "ipv6"]
_FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
Tried = Literal["yes", "maybe", "no"]
"""Does Postfix try an address: always, in some deliveries (equal-preference order is random), never."""


async def diagnose(domain: str, config: DiagnosisConfig) -> Diagnosis:
    """Diagnose `domain`'s DANE state as mailcow's Postfix sees it; raises InvalidDomain on bad input."""
    name = normalize_domain(domain)
    started = time.monotonic()
    checked_at = datetime.now(UTC)
    run = _Run(name, config)
    try:
        async with asyncio.timeout(config.diagnosis_deadline):
            await run.execute()
    except TimeoutError:
        run.deadline_hit = True
    mx = run.mx.lookup if run.mx is not None else _unanswered(name, config.diagnosis_deadline)
    hosts = [run.host_result(h) for h in run.hosts]
    validates: bool | None = None
    if run.selftest_ok or mx.ad or any(h.dnssec == "secure" for h in hosts):
        validates = True
    elif run.selftest_ok is False:
        validates = False
    verdict: Verdict
    failure_class: FailureClass | None
    if run.deadline_hit and validates is not False:
        verdict, failure_class = "unknown", None
    else:
        verdict, failure_class = _verdict(mx, hosts, validates, run.null_mx)
    recommended, contingency = _recommend(name, verdict, failure_class, hosts)
    explanation = domain_explanation(
        domain=name,
        verdict=verdict,
        failure_class=failure_class,
        hosts=hosts,
        mx=mx,
        null_mx=run.null_mx,
        recommended=recommended,
        contingency=contingency,
        resolver=config.resolver_label,
        resolver_validates=validates,
        deadline=config.diagnosis_deadline if run.deadline_hit else None,
        notes=run.notes(hosts),
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
        mx=mx,
        implicit_mx=run.implicit,
        null_mx=run.null_mx,
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


@dataclass
class _Planned:
    address: str
    family: Family
    tried: Tried = "yes"
    probe: bool = True


@dataclass
class _HostState:
    """What is known about one MX host so far; a deadline can stop the run at any step."""

    name: str
    preference: int
    implicit: bool
    beyond_cap: bool = False
    a: Answer | None = None
    aaaa: Answer | None = None
    addresses: list[_Planned] = field(default_factory=list)
    tlsa: _Tlsa | None = None
    checks: dict[str, _AddressCheck] = field(default_factory=dict)


class _Run:
    """One diagnosis: the resolver client, the limit on queries and probes in flight, and the facts."""

    def __init__(self, domain: str, config: DiagnosisConfig) -> None:
        self.domain = domain
        self.config = config
        self.slots = asyncio.Semaphore(config.concurrency)
        self.client = DnsClient(config.resolver, config.timeout, self.slots)
        self.mx_secure = False
        self.selftest_ok: bool | None = None
        self.mx: Answer | None = None
        self.hosts: list[_HostState] = []
        self.implicit = False
        self.null_mx = False
        self.deadline_hit = False

    async def execute(self) -> None:
        await asyncio.gather(self._selftest(), self._mail_exchangers())

    async def _selftest(self) -> None:
        """Does the resolver validate? AD=1 on a zone known to be signed (dane.md §2.1 step 0)."""
        answer = await self.client.lookup(dns.name.from_text(self.config.selftest_name), "DNSKEY", show_published=False)
        if answer.rcode == "TIMEOUT":
            return
        # Any answer without AD (an error, or data the resolver did not validate) means DANE is off.
        self.selftest_ok = answer.rcode == "NOERROR" and answer.lookup.ad

    async def _mail_exchangers(self) -> None:
        self.mx = await self.client.lookup(dns.name.from_text(self.domain), "MX")
        self.hosts = self._hosts_from(self.mx)
        checked = [h for h in self.hosts if not h.beyond_cap]
        await asyncio.gather(*(self._lookup_addresses(h) for h in checked))
        self._plan(checked)
        await asyncio.gather(*(self._check_host(h) for h in checked if h.addresses))

    def _hosts_from(self, mx: Answer) -> list[_HostState]:
        """MX hosts in preference order (step 1), the first `max_mx_hosts` to be checked."""
        if mx.security in ("bogus", "error") or mx.rcode != "NOERROR":
            return []
        self.mx_secure = mx.security == "secure"
        exchanges: dict[str, int] = {}
        for rdata in mx.rrset or []:
            assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
            target = rdata.exchange.to_text(omit_final_dot=True).lower()
            exchanges[target] = min(rdata.preference, exchanges.get(target, rdata.preference))
        if mx.rrset is not None and ("" in exchanges or "." in exchanges) and len(exchanges) == 1:
            self.null_mx = True
            return []
        self.implicit = mx.rrset is None
        if self.implicit:
            exchanges = {self.domain: 0}
        ordered = sorted(((h, p) for h, p in exchanges.items() if h), key=lambda item: (item[1], item[0]))
        return [
            _HostState(host, pref, self.implicit, beyond_cap=index >= self.config.max_mx_hosts)
            for index, (host, pref) in enumerate(ordered)
        ]

    async def _lookup_addresses(self, host: _HostState) -> None:
        qname = dns.name.from_text(host.name)
        a, aaaa = await asyncio.gather(self.client.lookup(qname, "A"), self.client.lookup(qname, "AAAA"))
        host.a, host.aaaa = a, aaaa
        host.addresses = [
            _Planned(rd.to_text(), "ipv4" if answer.lookup.rdtype == "A" else "ipv6")
            for answer in _usable_answers(a, aaaa)
            for rd in answer.rrset or []
        ]

    def _plan(self, hosts: Sequence[_HostState]) -> None:
        """Which addresses Postfix tries (smtp_mx_address_limit), and which of those we probe."""
        by_preference: dict[int, list[_Planned]] = {}
        for host in hosts:
            by_preference.setdefault(host.preference, []).extend(host.addresses)
        groups = [by_preference[p] for p in sorted(by_preference)]
        plan = plan_addresses([[a.family for a in group] for group in groups], self.config.mx_address_limit)
        for group, tried in zip(groups, plan, strict=True):
            for planned, flag in zip(group, tried, strict=True):
                planned.tried = flag
        # Equal-preference addresses are tried in random order, so a host can have more `maybe`
        # addresses than Postfix ever tries at once; probing that many per host is enough.
        cap = self.config.mx_address_limit or None  # 0: Postfix has no limit, neither do we
        for host in hosts:
            rank = 0
            for planned in host.addresses:
                planned.probe = planned.tried != "no" and (cap is None or rank < cap)
                rank += planned.tried != "no"

    async def _check_host(self, host: _HostState) -> None:
        """Steps 2 to 5 for one MX host with addresses: TLSA, probes, match."""
        assert host.a is not None and host.aaaa is not None
        if all(a.tried == "no" for a in host.addresses):
            return  # Postfix never gets to it: host_result() says so
        usable = _usable_answers(host.a, host.aaaa)
        canonical = usable[0].canonical_name
        host.tlsa = await self._check_tlsa(host.name, canonical, host_secure=_answers_security(usable) == "secure")
        level = _postfix_level(host.tlsa.result)
        canonical_text = _text(canonical)
        reference_names = list(dict.fromkeys([self.domain, host.name, canonical_text, host.tlsa.result.base_domain]))
        await asyncio.gather(
            *(
                self._check_address(host, planned, level, host.tlsa, reference_names)
                for planned in host.addresses
                if planned.probe
            )
        )

    async def _check_tlsa(self, host: str, canonical: dns.name.Name, *, host_secure: bool) -> _Tlsa:
        """Step 3: `_25._tcp` at the CNAME-expanded name, then at the original name (RFC 7672 §2.2.2)."""
        original = dns.name.from_text(host)
        names = [canonical] if canonical == original else [canonical, original]
        if not host_secure:
            # Postfix does not look for TLSA records of a host in an unsigned zone; we do, to explain.
            answer = await self._lookup_tlsa(canonical)
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
            answer = await self._lookup_tlsa(base)
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

    async def _lookup_tlsa(self, base: dns.name.Name) -> Answer:
        try:
            qname = _tlsa_name(base)
        except dns.name.NameTooLong:
            return _tlsa_name_too_long(base)
        return await self.client.lookup(qname, "TLSA")

    async def _check_address(
        self, host: _HostState, planned: _Planned, level: PostfixLevel, tlsa: _Tlsa, reference_names: list[str]
    ) -> None:
        """Step 4 and 5 for one address: probe (unless refused), then judge like Postfix."""
        address, family = planned.address, planned.family
        ip = ipaddress.ip_address(address)
        reserved = None if self.config.allow_reserved else not_global_reason(ip)
        if reserved is not None:
            host.checks[address] = _AddressCheck(
                AddressResult(
                    address=address,
                    family=family,
                    status="tlsa-lookup-error" if level == "defer" else "not-probed-reserved",
                    would_deliver=False if level == "defer" else None,
                    detail=f"not probed: {address} is {reserved} and allow_reserved is off",
                )
            )
            return
        # Postfix sends SNI only at the dane level; under a fingerprint, verify, secure, encrypt or may
        # override it sends none, because mailcow sets no `servername=` (postconf(5)
        # smtp_tls_servername). A server may pick its certificate by SNI, so the override advice is
        # judged on a second probe without SNI: that is the chain Postfix will see with the
        # recommended override as it stands. (Recommending `servername=hostname` instead would send
        # the un-expanded MX name, not the TLSA base domain we probe with, and changes how Postfix
        # talks to every host of the domain.)
        if level in _SNI_LEVELS:
            outcome, without_sni = await asyncio.gather(
                self._probe(address, tlsa.result.base_domain), self._probe(address, None)
            )
        else:
            outcome, without_sni = await self._probe(address, None), None
        override = without_sni or outcome
        dane: DaneMatch | None = None
        pkix_names: list[str] = []
        pkix_error: str | None = None
        if outcome.chain and level == "dane":
            dane = match_dane(outcome.chain, tlsa.records, reference_names, datetime.now(UTC))
        if override.chain:
            candidates = [*reference_names, *(override.probe.chain[0].dns_names)]
            pkix = await asyncio.to_thread(pkix_check, override.chain, candidates, self.config.ca_file)
            pkix_names, pkix_error = pkix.names, pkix.error
        status, would, tls = _judge(level, tlsa.result, outcome, dane, self.mx_secure, family)
        host.checks[address] = _AddressCheck(
            AddressResult(
                address=address,
                family=family,
                status=status,
                would_deliver=would,
                postfix_tls=tls,
                detail=address_detail(status, level, tlsa.result, outcome.probe, dane, host.name),
                matched=dane.matched if dane else [],
                pkix_names=pkix_names,
                pkix_error=pkix_error,
                probe=outcome.probe,
                probe_without_sni=without_sni.probe if without_sni else None,
            ),
            dane,
        )

    async def _probe(self, address: str, sni: str | None) -> ProbeOutcome:
        config = self.config
        async with self.slots:
            return await probe_smtp(
                address, config.smtp_port, sni, config.helo_name, config.timeout, config.probe_deadline
            )

    # -- results ------------------------------------------------------------------------------

    def host_result(self, host: _HostState) -> MxHost:
        """The host as far as it got: complete, or cut short by the caps or the deadline."""
        if host.beyond_cap:
            return _unchecked_host(
                host, f"{host.name}: not checked: only the first {self.config.max_mx_hosts} MX hosts are checked"
            )
        if host.a is None or host.aaaa is None:
            return _unchecked_host(host, f"{host.name}: not checked: {self._deadline_text()} before its address lookup")
        lookups = [host.a.lookup, host.aaaa.lookup]
        usable = _usable_answers(host.a, host.aaaa)
        canonical = _text(usable[0].canonical_name if usable else host.a.canonical_name)
        if not usable:
            return self._host_without_addresses(host, canonical, lookups)
        dnssec = _answers_security(usable)
        notes = _family_notes(host.a, host.aaaa)
        unfinished: tuple[str, str] | None = None
        if all(a.tried == "no" for a in host.addresses):
            unfinished = ("not-tried", _NOT_TRIED.format(limit=self.config.mx_address_limit))
        elif host.tlsa is None:
            unfinished = ("not-checked", f"not checked: {self._deadline_text()} before its TLSA lookup")
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
                addresses=[self._pending(a, level="unknown") for a in host.addresses],
            )
        tlsa = host.tlsa
        assert tlsa is not None  # else the host is unfinished (above)
        level = _postfix_level(tlsa.result)
        results = [
            host.checks[a.address].result if a.address in host.checks else self._pending(a, level)
            for a in host.addresses
        ]
        checks = [host.checks[a.address] for a in host.addresses if a.address in host.checks]
        tried = [r for r in results if r.tried]
        would = _any_delivers([r.would_deliver for r in tried])
        failing = next((r for r in tried if r.would_deliver is False), None)
        status = failing.status if failing else tried[0].status
        leaf = next((r.probe.chain[0] for r in tried if r.probe and r.probe.chain), None)
        explanation = host_explanation(host.name, level, tlsa.result, status, tried, self.mx_secure)
        if notes:
            explanation += f" (note: {'; '.join(notes)})"
        return MxHost(
            **known,
            postfix_level=level,
            tlsa=tlsa.result,
            status=status,
            would_deliver=would,
            failure_class=_host_class(level, tlsa, checks),
            tlsa_3_1_1=leaf.tlsa_3_1_1 if leaf else None,
            tlsa_3_0_1=leaf.tlsa_3_0_1 if leaf else None,
            pkey_fingerprint=leaf.pkey_fingerprint if leaf else None,
            explanation=explanation,
            advice=host_advice(tlsa.result, [c.result for c in checks], [c.dane for c in checks]),
            addresses=results,
        )

    def _pending(self, planned: _Planned, level: PostfixLevel) -> AddressResult:
        """An address without a probe result: never tried by Postfix, beyond the probe cap, or cut off."""
        if planned.tried == "no":
            status: AddressStatus = "not-tried"
            detail = _NOT_TRIED.format(limit=self.config.mx_address_limit)
        elif not planned.probe:
            status = "not-probed"
            detail = (
                f"not probed: Postfix tries only {self.config.mx_address_limit} of this preference's addresses "
                "(in random order), and at most that many are probed per host"
            )
        else:
            status = "not-probed"
            detail = f"not probed: {self._deadline_text()}"
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

    def _host_without_addresses(self, host: _HostState, canonical: str, lookups: list[DnsLookup]) -> MxHost:
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
            explanation=host_explanation(host.name, "defer", None, status, [], self.mx_secure, lookups),
        )

    def _deadline_text(self) -> str:
        return f"the diagnosis deadline ({self.config.diagnosis_deadline:g} s) passed"

    def notes(self, hosts: Sequence[MxHost]) -> list[str]:
        """Caps that left hosts or addresses out, for the domain explanation."""
        notes: list[str] = []
        capped = sum(1 for h in self.hosts if h.beyond_cap)
        if capped:
            notes.append(
                f"Only the first {self.config.max_mx_hosts} of {len(self.hosts)} MX hosts were checked; "
                f"Postfix tries at most {self.config.mx_address_limit} addresses per delivery, so it rarely "
                "gets that far."
            )
        not_tried = sum(1 for h in hosts for a in h.addresses if not a.tried)
        if not_tried:
            notes.append(
                f"{not_tried} address{'es' if not_tried != 1 else ''} come after the first "
                f"{self.config.mx_address_limit} Postfix tries (smtp_mx_address_limit): not probed and not "
                "part of the verdict."
            )
        return notes


_NOT_TRIED = (
    "not tried: Postfix stops after {limit} addresses per delivery (smtp_mx_address_limit), and this one "
    "comes after them"
)


def plan_addresses(groups: Sequence[Sequence[Family]], limit: int) -> list[list[Tried]]:
    """Which addresses Postfix tries, per MX preference group (best first, families in any order).

    Postfix (smtp_addr.c, smtp_connect.c) shuffles the addresses of equal preference, keeps the
    preference order, balances IPv4 and IPv6 within the limit (`smtp_balance_inet_protocols = yes`),
    then tries at most `smtp_mx_address_limit` addresses per delivery. So an address is tried always
    (`yes`), in some deliveries (`maybe`: its group straddles the limit), or never (`no`)."""
    total = sum(len(group) for group in groups)
    if limit <= 0 or total <= limit:
        return [["yes"] * len(group) for group in groups]
    v4 = sum(group.count("ipv4") for group in groups)
    v6 = total - v4
    targets: list[dict[Family, int]]
    if v4 and v6:
        if v6 <= limit // 2:
            targets = [{"ipv4": limit - v6, "ipv6": v6}]
        elif v4 <= limit // 2:
            targets = [{"ipv4": v4, "ipv6": limit - v4}]
        else:
            # Which family comes first is random when the best group has both: consider either.
            firsts = sorted(set(groups[0]))
            targets = []
            for first in firsts:
                v4_target = (limit + (first == "ipv4")) // 2
                targets.append({"ipv4": v4_target, "ipv6": limit - v4_target})
    else:
        targets = [{"ipv4": limit, "ipv6": limit}]
    variants = [_cut(groups, target) for target in targets]
    return [
        [_combine([variant[g][i] for variant in variants]) for i in range(len(group))] for g, group in enumerate(groups)
    ]


def _cut(groups: Sequence[Sequence[Family]], target: dict[Family, int]) -> list[list[Tried]]:
    seen: dict[Family, int] = {"ipv4": 0, "ipv6": 0}
    out: list[list[Tried]] = []
    for group in groups:
        flags: dict[Family, Tried] = {}
        for family in _FAMILIES:
            count = sum(1 for f in group if f == family)
            before = seen[family]
            if before + count <= target[family]:
                flags[family] = "yes"
            elif before >= target[family]:
                flags[family] = "no"
            else:
                flags[family] = "maybe"
            seen[family] = before + count
        out.append([flags[f] for f in group])
    return out


def _combine(flags: Sequence[Tried]) -> Tried:
    if all(f == "yes" for f in flags):
        return "yes"
    if all(f == "no" for f in flags):
        return "no"
    return "maybe"


def not_global_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be probed without allow_reserved, or None for a global address.

    IPv6 addresses that embed an IPv4 address (NAT64 64:ff9b::/96, 6to4 2002::/16, IPv4-compatible
    ::/96, IPv4-mapped ::ffff:0:0/96) reach that IPv4 address, so it has to be global too."""
    if not ip.is_global or ip.is_multicast:
        return _reserved_kind(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None and (not embedded.is_global or embedded.is_multicast):
            return f"an IPv6 address embedding {embedded}, {_reserved_kind(embedded)}"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _unchecked_host(host: _HostState, explanation: str) -> MxHost:
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


def _unanswered(domain: str, deadline: float) -> DnsLookup:
    return DnsLookup(
        qname=domain,
        rdtype="MX",
        rcode="TIMEOUT",
        ad=False,
        security="error",
        canonical_name=domain,
        error=f"no answer before the diagnosis deadline ({deadline:g} s)",
    )


def _tlsa_name_too_long(base: dns.name.Name) -> Answer:
    """`_25._tcp.<base>` exceeds 255 octets: no query can carry it. What Postfix makes of it
    (dns_lookup.c): a name longer than valid_hostname()'s 255 characters is "not found" (no TLSA
    records, opportunistic TLS); a shorter text whose wire form is still too long fails res_mkquery(),
    a lookup error (the message is deferred)."""
    text = "_25._tcp." + _text(base)
    not_found = len(text) > _VALID_HOSTNAME_LEN
    lookup = DnsLookup(
        qname=text,
        rdtype="TLSA",
        rcode="NXDOMAIN" if not_found else "NAME-TOO-LONG",
        # Postfix's own refusal, not the resolver's answer: as secure as the host name it came from.
        ad=not_found,
        security="secure" if not_found else "error",
        canonical_name=text,
        error="TLSA name too long (over 255 octets): not queried; "
        + (
            "Postfix rejects it as an invalid name and treats the host as having no TLSA records"
            if not_found
            else "Postfix cannot build the query and reports a TLSA lookup error"
        ),
    )
    return Answer(lookup, None, base)


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
    if level == "defer" and tlsa.result.state == "error":
        return "E"
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
    # Only what Postfix tries counts: hosts and addresses past smtp_mx_address_limit (or the host cap)
    # never see a connection.
    considered = [h for h in hosts if h.tried]
    if not considered:
        return "unknown", None
    address_states = [a.would_deliver for h in considered for a in h.addresses if a.tried]
    any_address_fails = any(s is False for s in address_states) or any(not h.addresses for h in considered)
    host_states = [h.would_deliver for h in considered]
    if all(s is True for s in host_states) and not any_address_fails:
        verdict: Verdict = "ok"
    elif any(s is True for s in host_states) and any_address_fails:
        verdict = "degraded"
    elif all(s is False for s in host_states):
        verdict = "blocked"
    else:
        verdict = "unknown"
    return verdict, _domain_class(verdict, considered)


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

    def fixing(candidates: Sequence[PolicyOption]) -> list[tuple[PolicyOption, bool]]:
        found: list[tuple[PolicyOption, bool]] = []
        for option in candidates:
            outcome = simulate(option.policy, option.parameters, domain, hosts)
            fixes = any(o.delivers is True for o in outcome if (o.host, o.address) in failing)
            keeps = all(o.delivers is True for o in outcome if (o.host, o.address) in working)
            if fixes:
                plaintext = any(o.plaintext for o in outcome)
                found.append((option.model_copy(update={"plaintext": plaintext}), keeps))
        return found

    # `may` allows plaintext: dane.md §2.3 says to avoid it for every class that a TLS-mandatory
    # policy fixes (A, A', E, H), so it is offered only when none does (class B, no STARTTLS).
    options = fixing(_candidates(hosts)) or fixing([_MAY])
    ranked = [o for o, keeps in options if keeps] or [o for o, _ in options]
    if not ranked:
        return None
    first, rest = ranked[0], ranked[1:]
    return Recommendation(**first.model_dump(), alternatives=rest)


_MAY = PolicyOption(
    policy="may",
    reason="opportunistic TLS: the only option that delivers when STARTTLS is missing, and then "
    "mail goes to that host in PLAINTEXT",
)


def _candidates(hosts: Sequence[MxHost]) -> list[PolicyOption]:
    """TLS-mandatory overrides, strongest first. The fingerprints are those served without SNI, as
    Postfix connects under a fingerprint override."""
    fingerprints = list(
        dict.fromkeys(
            probe.chain[0].pkey_fingerprint
            for h in hosts
            for a in h.addresses
            if (probe := a.override_probe) is not None and probe.chain
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
    return sorted(options, key=lambda o: -POLICY_STRENGTH[o.policy])


def _usable_answers(a: Answer, aaaa: Answer) -> list[Answer]:
    """The address answers Postfix uses: any family that returned addresses (dns_lookup_rv returns
    success when one type succeeds). With none, the host has no usable address."""
    return [answer for answer in (a, aaaa) if answer.rrset is not None and answer.security not in ("bogus", "error")]


def _answers_security(answers: Sequence[Answer]) -> Security:
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


def _records(answer: Answer) -> list[TlsaRecord]:
    records = []
    for rdata in answer.rrset or []:
        fields = tlsa_fields(rdata)
        if fields is not None:
            usage, selector, mtype, data = fields
            records.append(make_tlsa_record(usage, selector, mtype, data.hex()))
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
