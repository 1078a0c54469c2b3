"""Raw queries to the validating resolver: rcode, AD bit and Extended DNS Errors, as Postfix sees them.

Postfix validates nothing itself; it trusts the AD bit of mailcow's unbound. So do we: the
security of an answer is the resolver's, never our own validation (dane.md §0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from app.diagnosis.config import parse_resolver
from app.diagnosis.models import DnsLookup, ExtendedError, Security

# EDE codes that mean "DNSSEC validation failed" (RFC 8914 §4; the same set as internet.nl).
BOGUS_EDE_CODES = frozenset({6, 7, 8, 9, 10, 11, 12})

_EDNS_PAYLOAD = 1232


@dataclass(frozen=True)
class Answer:
    """A lookup as stored in the diagnosis, plus the parsed RRset for further checks."""

    lookup: DnsLookup
    rrset: dns.rrset.RRset | None
    canonical_name: dns.name.Name

    @property
    def security(self) -> Security:
        return self.lookup.security

    @property
    def rcode(self) -> str:
        return self.lookup.rcode


class DnsClient:
    """Sends every query with DO and AD set to one validating resolver (or the system's)."""

    def __init__(self, resolver: str | None, timeout: float) -> None:
        if resolver is None:
            system = dns.resolver.Resolver(configure=True)
            self._servers = [(str(server), 53) for server in system.nameservers]
        else:
            self._servers = [parse_resolver(resolver)]
        self._timeout = timeout

    async def lookup(self, name: dns.name.Name, rdtype: str, *, show_published: bool = True) -> Answer:
        """Query `name`/`rdtype`; on SERVFAIL re-query with CD=1 to record what is published."""
        try:
            response = await self._exchange(name, rdtype, checking_disabled=False)
        except LookupFailed as exc:
            lookup = DnsLookup(
                qname=_text(name),
                rdtype=rdtype,
                rcode="TIMEOUT",
                ad=False,
                security="error",
                canonical_name=_text(name),
                error=str(exc),
            )
            return Answer(lookup, None, name)
        answer = _to_answer(name, rdtype, response)
        if answer.rcode == "SERVFAIL" and show_published:
            answer = await self._add_published(answer, name, rdtype)
        return answer

    async def _add_published(self, answer: Answer, name: dns.name.Name, rdtype: str) -> Answer:
        try:
            response = await self._exchange(name, rdtype, checking_disabled=True)
        except LookupFailed:
            return answer
        unchecked = _to_answer(name, rdtype, response)
        published = [*unchecked.lookup.cnames, *unchecked.lookup.answers]
        if unchecked.rcode not in ("NOERROR", "NXDOMAIN"):
            published = [f"({unchecked.rcode} even with CD=1)"]
        elif not published:
            published = [f"({unchecked.rcode}, no {rdtype} records)"]
        return Answer(answer.lookup.model_copy(update={"published": published}), None, answer.canonical_name)

    async def _exchange(self, name: dns.name.Name, rdtype: str, *, checking_disabled: bool) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=_EDNS_PAYLOAD)
        query.flags |= dns.flags.AD
        if checking_disabled:
            query.flags |= dns.flags.CD
        errors: list[str] = []
        for host, port in self._servers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(query, host, timeout=self._timeout, port=port)
                return response
            except (dns.exception.DNSException, OSError) as exc:
                errors.append(f"{host}:{port}: {type(exc).__name__} {exc}".strip())
        raise LookupFailed("; ".join(errors) or "no resolver configured")


class LookupFailed(Exception):
    """No resolver answered."""


def _to_answer(name: dns.name.Name, rdtype: str, response: dns.message.Message) -> Answer:
    rcode = dns.rcode.to_text(response.rcode())
    ad = bool(response.flags & dns.flags.AD)
    ede = [
        ExtendedError(code=int(option.code), name=_ede_name(int(option.code)), text=option.text or "")
        for option in response.extended_errors()
    ]
    rrset: dns.rrset.RRset | None = None
    canonical = name
    cnames: list[str] = []
    error: str | None = None
    if isinstance(response, dns.message.QueryMessage):
        try:
            chain = response.resolve_chaining()
            rrset, canonical = chain.answer, chain.canonical_name
            cnames = [f"{_text(c.name)} -> {_text(rd.target)}" for c in chain.cnames for rd in c]
        except dns.exception.DNSException as exc:
            error = f"unusable answer: {type(exc).__name__}"
    lookup = DnsLookup(
        qname=_text(name),
        rdtype=rdtype,
        rcode=rcode,
        ad=ad,
        security=_security(rcode, ad, ede),
        ede=ede,
        answers=sorted(rd.to_text() for rd in rrset) if rrset is not None else [],
        canonical_name=_text(canonical),
        cnames=cnames,
        error=error,
    )
    return Answer(lookup, rrset, canonical)


def _security(rcode: str, ad: bool, ede: list[ExtendedError]) -> Security:
    if rcode == "SERVFAIL":
        return "bogus" if any(e.code in BOGUS_EDE_CODES for e in ede) else "error"
    if rcode in ("NOERROR", "NXDOMAIN"):
        return "secure" if ad else "insecure"
    return "error"


def _ede_name(code: int) -> str:
    try:
        return dns.edns.EDECode(code).name.replace("_", " ").title()
    except ValueError:
        return f"EDE {code}"


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def describe_failure(lookup: DnsLookup) -> str:
    """`SERVFAIL, EDE 7 (Signature Expired): signature expired …` for explanations."""
    parts = [lookup.rcode]
    for e in lookup.ede:
        parts.append(f"EDE {e.code} ({e.name})" + (f": {e.text}" if e.text else ""))
    if lookup.error:
        parts.append(lookup.error)
    return ", ".join(parts)
