"""Raw queries to the validating resolver: rcode, AD bit and Extended DNS Errors, as Postfix sees them.

Postfix validates nothing itself; it trusts the AD bit of mailcow's unbound. So do we: the
security of an answer is the resolver's, never our own validation (dane.md §0.1).

A SERVFAIL is DNSSEC-bogus when it carries a DNSSEC Extended DNS Error, or, because mailcow's unbound
sends no EDE (no `ede: yes` in its unbound.conf), when the same query with CD=1 (checking disabled)
gets an answer: the data is there, only its validation fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TLSA
import dns.resolver
import dns.rrset
import dns.wire

from app.diagnosis.config import parse_resolver
from app.diagnosis.models import DnsLookup, ExtendedError, Security

# EDE codes that mean "DNSSEC validation failed" (RFC 8914 §4; the same set as internet.nl).
BOGUS_EDE_CODES = frozenset({6, 7, 8, 9, 10, 11, 12})

_EDNS_PAYLOAD = 1232

CD_ANSWERS = "SERVFAIL without a DNSSEC EDE, but the query with CD=1 (checking disabled) is answered: validation fails"


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

    def __init__(self, resolver: str | None, timeout: float, slots: asyncio.Semaphore | None = None) -> None:
        if resolver is None:
            system = dns.resolver.Resolver(configure=True)
            self._servers = [(str(server), 53) for server in system.nameservers]
        else:
            self._servers = [parse_resolver(resolver)]
        self._timeout = timeout
        # Shared with the SMTP probes: one diagnosis has at most that many queries and probes in flight.
        self._slots = slots

    async def lookup(self, name: dns.name.Name, rdtype: str, *, show_published: bool = True) -> Answer:
        """Query `name`/`rdtype`; on SERVFAIL re-query with CD=1: an answer then means the SERVFAIL is a
        validation failure (bogus), and `show_published` records what that answer holds."""
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
        if answer.rcode == "SERVFAIL":
            answer = await self._without_checking(answer, name, rdtype, show_published)
        return answer

    async def _without_checking(self, answer: Answer, name: dns.name.Name, rdtype: str, show_published: bool) -> Answer:
        try:
            response = await self._exchange(name, rdtype, checking_disabled=True)
        except LookupFailed:
            return answer
        unchecked = _to_answer(name, rdtype, response)
        published = [*unchecked.lookup.cnames, *unchecked.lookup.answers]
        update: dict[str, object] = {}
        if unchecked.rcode not in ("NOERROR", "NXDOMAIN"):
            published = [f"({unchecked.rcode} even with CD=1)"]
        else:
            if not published:
                published = [f"({unchecked.rcode}, no {rdtype} records)"]
            if answer.lookup.security == "error":
                # No DNSSEC EDE (mailcow's unbound sends none), but the data resolves without
                # validation: the SERVFAIL is a validation failure.
                update = {"security": "bogus", "error": CD_ANSWERS}
        if show_published:
            update["published"] = published
        lookup = answer.lookup.model_copy(update=update)
        return Answer(lookup, None, answer.canonical_name)

    async def _exchange(self, name: dns.name.Name, rdtype: str, *, checking_disabled: bool) -> dns.message.Message:
        async with self._slots if self._slots is not None else contextlib.nullcontext():
            return await self._exchange_now(name, rdtype, checking_disabled=checking_disabled)

    async def _exchange_now(self, name: dns.name.Name, rdtype: str, *, checking_disabled: bool) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=_EDNS_PAYLOAD)
        query.flags |= dns.flags.AD
        if checking_disabled:
            query.flags |= dns.flags.CD
        errors: list[str] = []
        for host, port in self._servers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(query, host, timeout=self._timeout, port=port)
                return response
            except dns.exception.FormError as exc:
                if rdtype != "TLSA":
                    errors.append(f"{host}:{port}: {type(exc).__name__} {exc}".strip())
                    continue
                # dnspython refuses a TLSA record whose digest length does not fit its matching type;
                # Postfix just calls it unusable ("unusable TLSA RR"). Keep such records, raw.
                try:
                    return await _lenient_exchange(query, host, port, self._timeout)
                except (dns.exception.DNSException, OSError, TimeoutError, ValueError) as again:
                    errors.append(f"{host}:{port}: {type(again).__name__} {again}".strip())
            except (dns.exception.DNSException, OSError) as exc:
                errors.append(f"{host}:{port}: {type(exc).__name__} {exc}".strip())
        raise LookupFailed("; ".join(errors) or "no resolver configured")


class LookupFailed(Exception):
    """No resolver answered."""


async def _lenient_exchange(query: dns.message.Message, host: str, port: int, timeout: float) -> dns.message.Message:
    """The exchange again, parsed so that TLSA records dnspython rejects are kept as GenericRdata."""
    wire = await _raw_udp(query.to_wire(), host, port, timeout)
    if len(wire) > 2 and wire[2] & 0x02:  # TC: the whole answer comes over TCP
        wire = await _raw_tcp(query.to_wire(), host, port, timeout)
    response = dns.message.from_wire(wire, continue_on_error=True)
    if response.id != query.id:
        raise ValueError("response does not match the query")
    for owner, ttl, data in _malformed_tlsa(wire):
        rrset = response.find_rrset(response.answer, owner, dns.rdataclass.IN, dns.rdatatype.TLSA, create=True)
        rrset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, data), ttl)
    return response


def _malformed_tlsa(wire: bytes) -> list[tuple[dns.name.Name, int, bytes]]:
    """TLSA records of the answer section that dnspython will not parse: (owner, ttl, rdata)."""
    parser = dns.wire.Parser(wire)
    _, _, qdcount, ancount = parser.get_struct("!HHHH")
    parser.seek(12)
    for _ in range(qdcount):
        parser.get_name(decompress=True)
        parser.get_struct("!HH")
    found = []
    for _ in range(ancount):
        owner = parser.get_name(decompress=True)
        rdtype, _, ttl, rdlen = parser.get_struct("!HHIH")
        data = parser.get_bytes(rdlen)
        if rdtype != dns.rdatatype.TLSA or len(data) < 3:
            continue
        try:
            dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TLSA, data, 0, len(data))
        except dns.exception.FormError:
            found.append((owner, ttl, data))
    return found


async def _raw_udp(wire: bytes, host: str, port: int, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class _Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            if not received.done() and data[:2] == wire[:2]:
                received.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not received.done():
                received.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Protocol, remote_addr=(host, port))
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(received, timeout)
    finally:
        transport.close()


async def _raw_tcp(wire: bytes, host: str, port: int, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()


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
        answers=sorted(rdata_text(rd) for rd in rrset) if rrset is not None else [],
        canonical_name=_text(canonical),
        cnames=cnames,
        error=error,
    )
    return Answer(lookup, rrset, canonical)


def tlsa_fields(rdata: dns.rdata.Rdata) -> tuple[int, int, int, bytes] | None:
    """(usage, selector, matching type, data) of a TLSA record, parsed or kept raw; None otherwise."""
    if isinstance(rdata, dns.rdtypes.ANY.TLSA.TLSA):
        return rdata.usage, rdata.selector, rdata.mtype, rdata.cert
    if isinstance(rdata, dns.rdata.GenericRdata) and rdata.rdtype == dns.rdatatype.TLSA and len(rdata.data) >= 3:
        return rdata.data[0], rdata.data[1], rdata.data[2], rdata.data[3:]
    return None


def rdata_text(rdata: dns.rdata.Rdata) -> str:
    fields = tlsa_fields(rdata)
    if fields is not None:
        usage, selector, mtype, data = fields
        return f"{usage} {selector} {mtype} {data.hex()}"
    return rdata.to_text()


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
