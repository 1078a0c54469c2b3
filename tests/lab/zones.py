"""Lab zones: `test.` (the lab's signed root), `example.test`, `unsigned.test` and `bogus.test`."""

from __future__ import annotations

from tests.lab.pki import Issued
from tests.lab.topology import BOGUS_AAAA_ADDRESS, BOGUS_HOST_ADDRESS, LONG_HOSTS, MANY_MX, SERVERS

SOA = "@ SOA ns.test. hostmaster.test. 1 3600 600 86400 5"
TTL = 60

# ldns-signzone's default validity is 4 weeks from now; bogus.test gets dates long past (class F).
BOGUS_INCEPTION = "20240101000000"
BOGUS_EXPIRATION = "20240201000000"

# Records edited after signing, so their RRSIG no longer verifies.
CORRUPT_TLSA_OWNER = "_25._tcp.mx7.example.test."
CORRUPT_A_OWNER = "mx9.example.test."
CORRUPT_AAAA_OWNER = "mxbad6.example.test."


def _header(origin: str) -> list[str]:
    return [f"$ORIGIN {origin}.", f"$TTL {TTL}", SOA, "@ NS ns.test."]


def root_zone(ds_records: dict[str, list[str]]) -> str:
    """`test.`: delegations; DS only for the signed children, so unsigned.test is provably insecure."""
    lines = [*_header("test"), "ns A 127.0.0.1"]
    for child in ("example", "unsigned", "bogus"):
        lines.append(f"{child} NS ns.test.")
        lines.extend(f"{child} DS {ds}" for ds in ds_records.get(f"{child}.test", []))
    return "\n".join(lines) + "\n"


def example_zone(certs: dict[str, Issued], extra: dict[str, Issued]) -> str:
    """All example.test scenarios live in one signed zone."""
    lines = _header("example.test")
    lines += ["@ MX 10 mx1", "@ MX 20 mx2"]
    for server in SERVERS:
        if server.host.endswith(".example.test"):
            kind = "AAAA" if server.ipv6 else "A"
            lines.append(f"{server.host.removesuffix('.example.test')} {kind} {server.address}")
    lines.append(f"mx9 A {BOGUS_HOST_ADDRESS}")
    lines.append(f"mxbad6 AAAA {BOGUS_AAAA_ADDRESS}")
    lines.append("mxalias CNAME mx1")
    lines.append("mxalias2 CNAME mx6")

    def tlsa(owner: str, usage: int, selector: int, mtype: int, data: str) -> None:
        lines.append(f"_25._tcp.{owner} TLSA {usage} {selector} {mtype} {data}")

    tlsa("mx1", 3, 1, 1, certs["mx1"].spki_sha256)
    tlsa("mx1", 3, 1, 1, extra["mx1-next"].spki_sha256)  # rollover-ready: current + next
    tlsa("mx2", 3, 1, 1, extra["mx2-old"].spki_sha256)  # A: stale, the key changed
    tlsa("mx3", 3, 1, 1, certs["mx3"].spki_sha256)  # B: correct, but no STARTTLS
    tlsa("mx4", 1, 1, 1, certs["mx4"].spki_sha256)  # C: PKIX usages only
    tlsa("mx4", 0, 0, 1, extra["ca"].cert_sha256)
    tlsa("mx5", 2, 1, 1, extra["ca"].spki_sha256)  # DANE-TA, lab CA
    tlsa("mx7", 3, 1, 1, certs["mx7"].spki_sha256)  # E: corrupted after signing
    tlsa("mx8", 3, 0, 1, extra["mx8-old"].cert_sha256)  # A': previous certificate, same key
    tlsa("mx9", 3, 1, 1, certs["mx1"].spki_sha256)
    tlsa("mx10", 2, 1, 1, extra["ca"].spki_sha256)  # H: CA matches, the leaf names something else
    tlsa("mx11", 3, 1, 1, certs["mx11"].spki_sha256)  # I: DANE-EE on an expired leaf
    tlsa("mxalias2", 3, 1, 1, certs["mx6"].spki_sha256)  # TLSA only at the original (pre-CNAME) name
    tlsa("implicit", 3, 1, 1, certs["mx1"].spki_sha256)
    tlsa("mx12", 3, 1, 1, extra["mx12-old"].spki_sha256)  # A: stale; the server also picks its cert by SNI
    tlsa("mxdrip", 3, 1, 1, certs["drip"].spki_sha256)
    tlsa("mx15", 2, 1, 1, extra["ca-expired"].spki_sha256)  # DANE-TA on a CA past its validity
    tlsa("mx16", 3, 1, 1, certs["mx16"].spki_sha256)  # correct, but the host speaks only TLS 1.0/1.1
    tlsa("mxv6", 3, 1, 1, certs["v6only"].spki_sha256)  # IPv6 only, correct
    tlsa("mxdual", 3, 1, 1, certs["dual4"].spki_sha256)  # right for the IPv4 listener, stale for the IPv6 one
    tlsa("mxbad6", 3, 1, 1, certs["bad6"].spki_sha256)  # correct; only the AAAA record is bogus
    for i in range(1, MANY_MX + 1):
        lines.append(f"many{i} A {'127.0.0.11' if i <= 5 else '127.0.0.12'}")
        tlsa(f"many{i}", 3, 1, 1, certs["mx1"].spki_sha256 if i <= 5 else extra["mx2-old"].spki_sha256)
    for key, host in LONG_HOSTS.items():
        lines.append(f"{host}. A 127.0.0.16")
        lines.append(f"{key} MX 10 {host}.")
    # 3 1 1 with a 31-octet "digest" (must be 32): unusable, so Postfix falls back to encrypt (class C).
    lines.append("badlen-mx A 127.0.0.16")
    tlsa("badlen-mx", 3, 1, 1, certs["mx6"].spki_sha256[:62])
    for i in range(1, 5):
        tlsa(f"slow{i}", 3, 1, 1, certs[f"slow{i}"].spki_sha256)

    mx = {
        "good": ["10 mx1"],
        "stale": ["10 mx2"],
        "stalefirst": ["10 mx2", "20 mx1"],
        "stale301": ["10 mx8"],
        "nostarttls": ["10 mx3"],
        "pkix": ["10 mx4"],
        "ta": ["10 mx5"],
        "taname": ["10 mx10"],
        "expired": ["10 mx11"],
        "notlsa": ["10 mx6"],
        "bogustlsa": ["10 mx7"],
        "bogushost": ["10 mx9"],
        "cname": ["10 mxalias"],
        "cnameorig": ["10 mxalias2"],
        "nullmx": ["0 ."],
        "sni": ["10 mx12"],
        "many": [f"{10 * i} many{i}" for i in range(1, MANY_MX + 1)],
        "badlen": ["10 badlen-mx"],
        "taexpired": ["10 mx15"],
        "legacy": ["10 mx16"],
        "v6only": ["10 mxv6"],
        "dualstack": ["10 mxdual"],
        "bogusaaaa": ["10 mxbad6"],
        "drip": ["10 mxdrip"],
        "slowpair": ["10 mx1", "20 mxdrip"],
        "mx1host": ["10 slow1"],
        "mx2host": ["10 slow1", "20 slow2"],
        "mx4host": ["10 slow1", "20 slow2", "30 slow3", "40 slow4"],
    }
    for owner, targets in mx.items():
        lines.extend(f"{owner} MX {target}" for target in targets)
    lines.append(f"implicit A {SERVERS[0].address}")  # no MX: the domain itself is the host
    return "\n".join(lines) + "\n"


def unsigned_zone(certs: dict[str, Issued]) -> str:
    """D: TLSA in a zone without DS; D': an unsigned domain whose MX host is signed."""
    lines = _header("unsigned.test")
    lines += [
        "@ MX 10 mx",
        "mx A 127.0.0.21",
        f"_25._tcp.mx TLSA 3 1 1 {certs['unsigned'].spki_sha256}",
        "hosted MX 10 mx1.example.test.",
    ]
    return "\n".join(lines) + "\n"


def bogus_zone(certs: dict[str, Issued]) -> str:
    """F: signed, DS in the parent, every RRSIG expired."""
    lines = _header("bogus.test")
    lines += ["@ MX 10 mx", "mx A 127.0.0.31", f"_25._tcp.mx TLSA 3 1 1 {certs['bogus'].spki_sha256}"]
    return "\n".join(lines) + "\n"


def corrupt_signed_zone(text: str) -> str:
    """Change one digit of mx7's TLSA data, of mx9's address and of mxbad6's IPv6 address after signing."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] == CORRUPT_TLSA_OWNER and fields[3] == "TLSA":
            data = fields[-1]
            fields[-1] = ("1" if data[0] != "1" else "2") + data[1:]
            line = "\t".join(fields)
        elif len(fields) == 5 and fields[0] == CORRUPT_A_OWNER and fields[3] == "A":
            fields[-1] = fields[-1].rsplit(".", 1)[0] + ".29"
            line = "\t".join(fields)
        elif len(fields) == 5 and fields[0] == CORRUPT_AAAA_OWNER and fields[3] == "AAAA":
            fields[-1] = fields[-1].rsplit(":", 1)[0] + ":30"
            line = "\t".join(fields)
        out.append(line)
    return "\n".join(out) + "\n"
