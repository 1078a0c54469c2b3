"""The lab's scenarios (dane.md §3.2, plus classes G, H, I, null/implicit MX and the bench domains)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Server:
    """One SMTP listener, and the certificate it serves."""

    key: str
    host: str
    address: str
    cert: str = "self"
    """self | ca (lab CA issues it, chain leaf+CA) | ca-wrongname | expired | reissued."""
    starttls: bool = True
    slow: bool = False
    """Greets after the lab's banner delay (bench domains)."""
    extra_names: tuple[str, ...] = ()
    sni_only: bool = False
    """Serves its certificate only to clients that send SNI = its host name; without SNI (Postfix below
    the dane level) it serves a different, default certificate."""
    drip: bool = False
    """Drips its greeting as `220-` continuation lines, one every DRIP_INTERVAL seconds, for far longer
    than a probe's deadline."""
    legacy: bool = False
    """Speaks only TLS 1.0 and 1.1 (OpenSSL security level 0 on its side), like an old MTA."""

    @property
    def ipv6(self) -> bool:
        """An IPv6 listener: its address exists only in the namespace the posttls-finger run creates."""
        return ":" in self.address


SERVERS: tuple[Server, ...] = (
    Server("mx1", "mx1.example.test", "127.0.0.11", extra_names=("implicit.example.test",)),
    Server("mx2", "mx2.example.test", "127.0.0.12"),
    Server("mx3", "mx3.example.test", "127.0.0.13", starttls=False),
    Server("mx4", "mx4.example.test", "127.0.0.14"),
    Server("mx5", "mx5.example.test", "127.0.0.15", cert="ca"),
    Server("mx6", "mx6.example.test", "127.0.0.16"),
    Server("mx7", "mx7.example.test", "127.0.0.17"),
    Server("mx8", "mx8.example.test", "127.0.0.18", cert="reissued"),
    Server("mx10", "mx10.example.test", "127.0.0.20", cert="ca-wrongname"),
    Server("mx11", "mx11.example.test", "127.0.0.22", cert="expired"),
    Server("mx12", "mx12.example.test", "127.0.0.23", sni_only=True),
    Server("drip", "mxdrip.example.test", "127.0.0.24", drip=True),
    Server("mx15", "mx15.example.test", "127.0.0.25", cert="ca-expired"),
    Server("mx16", "mx16.example.test", "127.0.0.26", legacy=True),
    # IPv6 (namespace mode only): an IPv6-only host; a dual-stack host whose IPv6 listener serves a key
    # the TLSA records do not name; a host whose AAAA record is bogus (its A record is secure).
    Server("v6only", "mxv6.example.test", "fd7c:1ab::28"),
    Server("dual4", "mxdual.example.test", "127.0.0.27"),
    Server("dual6", "mxdual.example.test", "fd7c:1ab::27"),
    Server("bad6", "mxbad6.example.test", "127.0.0.28"),
    Server("unsigned", "mx.unsigned.test", "127.0.0.21"),
    Server("bogus", "mx.bogus.test", "127.0.0.31"),
    *(Server(f"slow{i}", f"slow{i}.example.test", f"127.0.0.{40 + i}", slow=True) for i in range(1, 5)),
)

DRIP_INTERVAL = 0.1

BOGUS_AAAA_ADDRESS = "fd7c:1ab::29"
"""mxbad6's AAAA record, edited after signing so that its RRSIG fails; nothing listens there."""

BOGUS_HOST_ADDRESS = "127.0.0.19"
"""mx9's A record, edited after signing so that its RRSIG fails (class G); nothing listens there."""

SCENARIO_DOMAINS: tuple[str, ...] = (
    "example.test",
    "good.example.test",
    "stale.example.test",
    "stalefirst.example.test",
    "stale301.example.test",
    "nostarttls.example.test",
    "pkix.example.test",
    "ta.example.test",
    "taname.example.test",
    "expired.example.test",
    "notlsa.example.test",
    "bogustlsa.example.test",
    "bogushost.example.test",
    "cname.example.test",
    "cnameorig.example.test",
    "implicit.example.test",
    "nullmx.example.test",
    "sni.example.test",
    "many.example.test",
    "longtlsa.example.test",
    "longertlsa.example.test",
    "badlen.example.test",
    "taexpired.example.test",
    "legacy.example.test",
    "unsigned.test",
    "hosted.unsigned.test",
    "bogus.test",
)

IPV6_DOMAINS: tuple[str, ...] = ("v6only.example.test", "dualstack.example.test", "bogusaaaa.example.test")
"""Scenarios with IPv6 MX addresses: diagnosed and compared with posttls-finger only inside the
namespace (tests/lab/netns.py), where the lab's IPv6 addresses exist on `lo`."""

OVERRIDE_CHECKS: dict[str, tuple[tuple[str, str], ...]] = {
    # Besides each recommendation: overrides whose outcome the diagnosis predicts (app.diagnosis.policy
    # simulate()), tried with posttls-finger. `{pkey:KEY}` is the pkey_fingerprint of lab server KEY.
    "legacy.example.test": (
        ("encrypt", ""),
        ("encrypt", "protocols=>=TLSv1"),
        ("encrypt", "protocols=>=TLSv1.2"),
        ("fingerprint", "match={pkey:mx16} protocols=>=TLSv1"),
        ("dane", "protocols=>=TLSv1"),
    ),
    "dualstack.example.test": (("fingerprint", "match={pkey:dual4}"),),
    "stale.example.test": (("encrypt", ""), ("fingerprint", "match={pkey:mx1}")),
    "nostarttls.example.test": (("encrypt", ""),),
}

MANY_MX = 12
"""many.example.test: MX hosts many1 … many12 at preferences 10, 20, …; many1-5 pass DANE, the rest are stale."""

LONG_HOSTS = {
    # "_25._tcp." + host is 254 characters, so Postfix's valid_hostname() accepts it, but 256 octets
    # on the wire: no query can carry it.
    "longtlsa": "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 40 + ".example.test",
    # 259 characters: Postfix rejects it as an invalid name before any query.
    "longertlsa": "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "e" * 45 + ".example.test",
}

SELFTEST_SERVFAIL = "lame.lab."
"""Unbound's stub for `lame.lab.` points at NSD, which serves no such zone and refuses every query:
Unbound answers SERVFAIL for a reason that has nothing to do with DNSSEC (a self-test name that fails
for an unrelated cause)."""

SLOW_DOMAINS: tuple[str, ...] = ("drip.example.test", "slowpair.example.test")
"""Deadline scenarios (not in SCENARIO_DOMAINS: each one waits for a probe deadline)."""

BENCH_DOMAINS: tuple[str, ...] = ("mx1host.example.test", "mx2host.example.test", "mx4host.example.test")
