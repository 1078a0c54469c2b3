"""How a diagnosis runs (resolver, port, limits), what counts as a valid recipient domain, and which
addresses may be probed without `allow_reserved`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import dns.exception
import dns.name
import idna

_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class InvalidDomain(ValueError):
    """The input is not a usable recipient domain name."""


@dataclass(frozen=True)
class DiagnosisConfig:
    resolver: str | None = None
    """`host:port` of a validating resolver (`127.0.0.1:5301`, `[::1]:53`); None = the system resolver."""
    smtp_port: int = 25
    """Where the probes connect. The TLSA name is always `_25._tcp`, as Postfix's."""
    timeout: float = 5.0
    """Per DNS query and per SMTP step (connect, each reply, TLS handshake). A probe as a whole gets
    twice that (`probe_deadline`), so a server that drips its replies line by line cannot hold it."""
    deadline: float | None = None
    """For the whole diagnosis; None = 6 times `timeout`. When it passes, the verdict is `unknown` and
    what was not finished is marked so."""
    allow_reserved: bool = False
    """Probe loopback/private/reserved addresses (a lab); off in production, as danecheck's `-R`."""
    concurrency: int = 8
    """At most this many SMTP probes and DNS queries at once, per diagnosis."""
    max_mx_hosts: int = 10
    """MX hosts checked, in preference order; the rest are listed as not checked."""
    mx_address_limit: int = 5
    """Postfix's `smtp_mx_address_limit` (mailcow keeps the default, 5): addresses beyond it are never tried."""
    helo_name: str = "tlsoverride.invalid"
    selftest_name: str = "."
    """A zone known to be signed; its DNSKEY must come back with AD=1 (a lab uses its own anchor)."""
    ca_file: str | None = None
    """CA bundle used to judge whether `verify`/`secure` would work; None = the system bundle."""

    def __post_init__(self) -> None:
        if not 0 < self.smtp_port < 65536:
            raise ValueError(f"smtp_port out of range: {self.smtp_port}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("deadline must be positive")
        if self.max_mx_hosts < 1:
            raise ValueError("max_mx_hosts must be at least 1")
        if self.mx_address_limit < 0:
            raise ValueError("mx_address_limit must be 0 (no limit) or more")
        if self.resolver is not None:
            parse_resolver(self.resolver)

    @property
    def resolver_label(self) -> str:
        return self.resolver or "system"

    @property
    def probe_deadline(self) -> float:
        return 2 * self.timeout

    @property
    def diagnosis_deadline(self) -> float:
        return self.deadline if self.deadline is not None else 6 * self.timeout


def parse_resolver(value: str) -> tuple[str, int]:
    """`127.0.0.1:5301`, `[::1]:53`, `::1` or `127.0.0.1` → (address, port)."""
    text = value.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad resolver address {value!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"resolver must be an IP address, got {value!r}") from exc
    if not 0 < port < 65536:
        raise ValueError(f"bad resolver port in {value!r}")
    return host, port


def normalize_domain(value: str) -> str:
    """A recipient domain as a lower-case IDNA A-label without the trailing dot, or InvalidDomain."""
    if not isinstance(value, str):
        raise InvalidDomain("domain must be a string")
    text = value.strip().rstrip(".")
    if not text or len(text) > 253:
        raise InvalidDomain(f"not a domain name: {value!r}")
    if any(ch.isspace() or ch in "@/\\:[]*_" for ch in text) or ".." in text:
        raise InvalidDomain(f"not a domain name: {value!r}")
    try:
        if text.isascii():
            name = dns.name.from_text(text)
        else:
            name = dns.name.from_unicode(text, idna_codec=dns.name.IDNA_2008_Practical)
        ascii_name = name.to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise InvalidDomain(f"not a valid domain name: {value!r} ({exc})") from exc
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise InvalidDomain(f"a recipient domain needs at least two labels: {value!r}")
    if len(ascii_name) > 253 or not all(_LDH_LABEL.match(label) for label in labels):
        raise InvalidDomain(f"not a host name (letters, digits, hyphens): {value!r}")
    if labels[-1].isdigit():
        raise InvalidDomain(f"an IP address is not a recipient domain: {value!r}")
    for label in labels:
        if label.startswith("xn--"):
            _check_a_label(label, value)
    return ascii_name


def _check_a_label(label: str, value: str) -> None:
    """An `xn--` label must be the punycode of a valid IDNA label: it decodes, and re-encodes to itself."""
    try:
        valid = idna.encode(idna.decode(label)).decode("ascii") == label
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidDomain(f"{label!r} in {value!r} is not a valid A-label ({exc})") from exc
    if not valid:
        raise InvalidDomain(f"{label!r} in {value!r} is not a valid A-label (it does not re-encode to itself)")


def not_global_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be probed without allow_reserved (what it is), or None for a global one.

    IPv6 addresses that embed an IPv4 address (IPv4-mapped ::ffff:0:0/96, NAT64 64:ff9b::/96, 6to4
    2002::/16, IPv4-compatible ::/96) reach that IPv4 address, so it has to be global too."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        mapped = ip.ipv4_mapped
        inner = not_global_reason(mapped)
        return None if inner is None else f"an IPv4-mapped IPv6 address of {mapped}, {inner}"
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
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_SPECIAL_RANGES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(network), name)
    for network, name in (
        ("0.0.0.0/32", "the unspecified address"),
        ("0.0.0.0/8", "a 'this network' address (0.0.0.0/8)"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address (RFC 1918)"),
        ("172.16.0.0/12", "a private address (RFC 1918)"),
        ("192.168.0.0/16", "a private address (RFC 1918)"),
        ("100.64.0.0/10", "a shared address (carrier-grade NAT, 100.64.0.0/10)"),
        ("169.254.0.0/16", "a link-local address"),
        ("192.0.0.0/24", "an IETF protocol assignment (192.0.0.0/24)"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15)"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address (240.0.0.0/4)"),
        ("::/128", "the unspecified address"),
        ("::1/128", "the loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fc00::/7", "a unique local address (fc00::/7)"),
        ("ff00::/8", "a multicast address"),
        ("2001:db8::/32", "a documentation address"),
        ("100::/64", "a discard-only address (100::/64)"),
    )
)


def _reserved_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for network, name in _SPECIAL_RANGES:
        if ip.version == network.version and ip in network:
            return name
    return "not a global address"
