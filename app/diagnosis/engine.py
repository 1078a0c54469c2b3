"""diagnose(): predict what mailcow's Postfix (`smtp_tls_security_level = dane`) does for a recipient
domain, in Postfix's own order (dane.md §2.1), and which override would fix it (§2.3)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import dns.name
import dns.rdtypes.ANY.MX

from app.diagnosis.certs import DaneMatch, make_tlsa_record, match_dane, pkix_check
from app.diagnosis.config import DiagnosisConfig, normalize_domain, not_global_reason
from app.diagnosis.explain import (
    address_detail,
    domain_explanation,
)
from app.diagnosis.hosts import (
    AddressCheck,
    HostFacts,
    PlannedAddress,
    TlsaFacts,
    answers_security,
    host_result,
    name_text,
    run_notes,
    usable_answers,
)
from app.diagnosis.models import (
    AddressResult,
    Diagnosis,
    DnsLookup,
    FailureClass,
    PostfixLevel,
    TlsaRecord,
    TlsaResult,
    Verdict,
)
from app.diagnosis.resolver import Answer, DnsClient, tlsa_fields
from app.diagnosis.rules import (
    domain_verdict,
    judge_address,
    plan_addresses,
    postfix_level,
    recommend,
    resolver_validates,
)
from app.diagnosis.smtp import ProbeOutcome, TlsProfile, probe_smtp

# Postfix sends SNI (the TLSA base domain) only when it starts at the dane level; that includes
# `encrypt` reached from all-unusable TLSA records, which falls back after SNI is set (tls_client.c).
_SNI_LEVELS: frozenset[PostfixLevel] = frozenset({"dane", "encrypt"})
# Postfix's valid_hostname() limit: a longer TLSA query name is "not found", never sent (dns_lookup.c).
_VALID_HOSTNAME_LEN = 255


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
    hosts = [host_result(h, config, run.mx_secure) for h in run.hosts]
    validates = resolver_validates(run.selftest, mx, hosts)
    verdict: Verdict
    failure_class: FailureClass | None
    if run.deadline_hit and validates is not False:
        verdict, failure_class = "unknown", None
    else:
        verdict, failure_class = domain_verdict(mx, hosts, validates, run.null_mx)
    recommended, contingency = recommend(name, verdict, failure_class, hosts)
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
        selftest=run.selftest,
        deadline=config.diagnosis_deadline if run.deadline_hit else None,
        notes=run_notes(run.hosts, hosts, config),
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
        selftest=run.selftest,
        smtp_port=config.smtp_port,
        mx=mx,
        implicit_mx=run.implicit,
        null_mx=run.null_mx,
        hosts=hosts,
        checked_at=checked_at,
        duration_ms=round((time.monotonic() - started) * 1000),
    )


class _Run:
    """One diagnosis: the resolver client, the limit on queries and probes in flight, and the facts."""

    def __init__(self, domain: str, config: DiagnosisConfig) -> None:
        self.domain = domain
        self.config = config
        self.slots = asyncio.Semaphore(config.concurrency)
        self.client = DnsClient(config.resolver, config.timeout, self.slots)
        self.mx_secure = False
        self.selftest: DnsLookup | None = None
        self.mx: Answer | None = None
        self.hosts: list[HostFacts] = []
        self.implicit = False
        self.null_mx = False
        self.deadline_hit = False

    async def execute(self) -> None:
        await asyncio.gather(self._selftest(), self._mail_exchangers())

    async def _selftest(self) -> None:
        """Does the resolver validate? AD=1 on a zone known to be signed (dane.md §2.1 step 0); how
        the answer counts is rules.resolver_validates()."""
        answer = await self.client.lookup(dns.name.from_text(self.config.selftest_name), "DNSKEY", show_published=False)
        self.selftest = answer.lookup

    async def _mail_exchangers(self) -> None:
        self.mx = await self.client.lookup(dns.name.from_text(self.domain), "MX")
        self.hosts = self._hosts_from(self.mx)
        checked = [h for h in self.hosts if not h.beyond_cap]
        await asyncio.gather(*(self._lookup_addresses(h) for h in checked))
        self._plan(checked)
        await asyncio.gather(*(self._check_host(h) for h in checked if h.addresses))

    def _hosts_from(self, mx: Answer) -> list[HostFacts]:
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
            HostFacts(host, pref, self.implicit, beyond_cap=index >= self.config.max_mx_hosts)
            for index, (host, pref) in enumerate(ordered)
        ]

    async def _lookup_addresses(self, host: HostFacts) -> None:
        qname = dns.name.from_text(host.name)
        a, aaaa = await asyncio.gather(self.client.lookup(qname, "A"), self.client.lookup(qname, "AAAA"))
        host.a, host.aaaa = a, aaaa
        host.addresses = [
            PlannedAddress(rd.to_text(), "ipv4" if answer.lookup.rdtype == "A" else "ipv6")
            for answer in usable_answers(a, aaaa)
            for rd in answer.rrset or []
        ]

    def _plan(self, hosts: Sequence[HostFacts]) -> None:
        """Which addresses Postfix tries (smtp_mx_address_limit), and which of those we probe."""
        by_preference: dict[int, list[PlannedAddress]] = {}
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

    async def _check_host(self, host: HostFacts) -> None:
        """Steps 2 to 5 for one MX host with addresses: TLSA, probes, match."""
        assert host.a is not None and host.aaaa is not None
        if all(a.tried == "no" for a in host.addresses):
            return  # Postfix never gets to it: host_result() says so
        usable = usable_answers(host.a, host.aaaa)
        canonical = usable[0].canonical_name
        host.tlsa = await self._check_tlsa(host.name, canonical, host_secure=answers_security(usable) == "secure")
        level = postfix_level(host.tlsa.result)
        canonical_text = name_text(canonical)
        reference_names = list(dict.fromkeys([self.domain, host.name, canonical_text, host.tlsa.result.base_domain]))
        await asyncio.gather(
            *(
                self._check_address(host, planned, level, host.tlsa, reference_names)
                for planned in host.addresses
                if planned.probe
            )
        )

    async def _check_tlsa(self, host: str, canonical: dns.name.Name, *, host_secure: bool) -> TlsaFacts:
        """Step 3: `_25._tcp` at the CNAME-expanded name, then at the original name (RFC 7672 §2.2.2)."""
        original = dns.name.from_text(host)
        names = [canonical] if canonical == original else [canonical, original]
        if not host_secure:
            # Postfix does not look for TLSA records of a host in an unsigned zone; we do, to explain.
            answer = await self._lookup_tlsa(canonical)
            return TlsaFacts(
                TlsaResult(
                    state="not-applicable",
                    base_domain=name_text(canonical),
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
                return TlsaFacts(TlsaResult(state="error", base_domain=name_text(base), lookups=lookups))
            records = _records(answer)
            if answer.security == "secure" and records:
                state = "usable" if any(r.usable for r in records) else "unusable"
                return TlsaFacts(
                    TlsaResult(state=state, base_domain=name_text(base), records=records, lookups=lookups), records
                )
            saw_insecure = saw_insecure or (answer.security == "insecure" and bool(records))
        state = "insecure" if saw_insecure else "none"
        return TlsaFacts(TlsaResult(state=state, base_domain=name_text(names[0]), lookups=lookups))

    async def _lookup_tlsa(self, base: dns.name.Name) -> Answer:
        try:
            qname = _tlsa_name(base)
        except dns.name.NameTooLong:
            return _tlsa_name_too_long(base)
        return await self.client.lookup(qname, "TLSA")

    async def _check_address(
        self, host: HostFacts, planned: PlannedAddress, level: PostfixLevel, tlsa: TlsaFacts, reference_names: list[str]
    ) -> None:
        """Step 4 and 5 for one address: probe (unless refused), then judge like Postfix."""
        address, family = planned.address, planned.family
        ip = ipaddress.ip_address(address)
        reserved = None if self.config.allow_reserved else not_global_reason(ip)
        if reserved is not None:
            host.checks[address] = AddressCheck(
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
        # The verdict probe negotiates as Postfix at this level (smtp.TlsProfile); the one without SNI as
        # Postfix under an authenticating override (encrypt accepts whatever that one does, and more).
        # At the may level the one probe serves both.
        profile: TlsProfile = "authenticated" if level == "dane" else "unauthenticated"
        if level in _SNI_LEVELS:
            outcome, without_sni = await asyncio.gather(
                self._probe(address, tlsa.result.base_domain, profile), self._probe(address, None, "authenticated")
            )
        else:
            outcome, without_sni = await self._probe(address, None, profile), None
        override = without_sni or outcome
        legacy: ProbeOutcome | None = None
        if override.probe.failed_stage == "handshake" and override.probe.starttls_offered:
            # What can the host do at all? Only then: a second round trip for the hosts that need it.
            legacy = await self._probe(address, None, "legacy")
        dane: DaneMatch | None = None
        pkix_names: list[str] = []
        pkix_error: str | None = None
        if outcome.chain and level == "dane":
            dane = match_dane(outcome.chain, tlsa.records, reference_names, datetime.now(UTC))
        if override.chain:
            # The MX host's names first: `verify` matches the host name by default.
            candidates = [*reference_names[1:], reference_names[0], *(override.probe.chain[0].dns_names)]
            pkix = await asyncio.to_thread(pkix_check, override.chain, candidates, self.config.ca_file)
            pkix_names, pkix_error = pkix.names, pkix.error
        status, would, tls = judge_address(level, tlsa.result, outcome.probe, dane, self.mx_secure, family)
        host.checks[address] = AddressCheck(
            AddressResult(
                address=address,
                family=family,
                status=status,
                would_deliver=would,
                postfix_tls=tls,
                detail=address_detail(
                    status, level, tlsa.result, outcome.probe, dane, host.name, legacy.probe if legacy else None
                ),
                matched=dane.matched if dane else [],
                pkix_names=pkix_names,
                pkix_error=pkix_error,
                probe=outcome.probe,
                probe_without_sni=without_sni.probe if without_sni else None,
                probe_legacy=legacy.probe if legacy else None,
            ),
            dane,
        )

    async def _probe(self, address: str, sni: str | None, profile: TlsProfile) -> ProbeOutcome:
        config = self.config
        async with self.slots:
            return await probe_smtp(
                address, config.smtp_port, sni, config.helo_name, config.timeout, config.probe_deadline, profile
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
    text = "_25._tcp." + name_text(base)
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


def _records(answer: Answer) -> list[TlsaRecord]:
    records = []
    for rdata in answer.rrset or []:
        fields = tlsa_fields(rdata)
        if fields is not None:
            usage, selector, mtype, data = fields
            records.append(make_tlsa_record(usage, selector, mtype, data.hex()))
    return records


def _tlsa_name(base: dns.name.Name) -> dns.name.Name:
    return dns.name.from_text("_25._tcp", origin=base)
