"""The diagnosis result: JSON-serialisable, stored with override requests, so keep it stable."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.mailcow.policies import TlsPolicy

SCHEMA_VERSION = 1

Verdict = Literal["ok", "degraded", "blocked", "unknown"]
"""`ok`: every MX host takes mail under mailcow's default `dane` policy; `degraded`: some fail, mail
still flows; `blocked`: none would take it; `unknown`: the checker could not tell (resolver does not
validate, addresses not probed)."""

FailureClass = Literal["A", "A'", "A''", "B", "C", "D", "D'", "E", "F", "G", "H", "I", "J", "K"]
"""Letters of dane.md §2.2."""

Security = Literal["secure", "insecure", "bogus", "error"]
"""DNSSEC state of one answer: AD=1, AD=0, SERVFAIL with a DNSSEC EDE code, or any other failure."""


PostfixLevel = Literal["dane", "encrypt", "may", "defer", "unknown"]
"""What Postfix's `dane` level turns into for one MX host, after its DNS lookups (`unknown`: the host
was not checked)."""

TlsaState = Literal["usable", "unusable", "none", "insecure", "error", "not-applicable"]

AddressStatus = Literal[
    "pass",
    "no-tlsa",
    "tlsa-unusable",
    "dane-not-applicable",
    "tlsa-mismatch",
    "name-mismatch",
    "cert-expired",
    "chain-invalid",
    "starttls-missing",
    "handshake-failed",
    "smtp-error",
    "unreachable",
    "tlsa-lookup-error",
    "host-lookup-error",
    "not-probed-reserved",
    "not-probed",
    "not-tried",
]
"""`not-probed`: no route from the checker, or not reached before the diagnosis deadline or the probe
cap; `not-tried`: Postfix never tries it (it comes after `smtp_mx_address_limit` addresses)."""

HostStatus = Literal[AddressStatus, "no-address", "not-checked"]
"""`not-checked`: beyond the MX host cap, or not reached before the diagnosis deadline."""

PostfixTls = Literal["Verified", "Trusted", "Untrusted", "plaintext"]
"""How Postfix would log the delivery: the TLS trust level, or `plaintext`."""

Stage = Literal["connect", "banner", "ehlo", "starttls", "handshake"]

Severity = Literal["info", "warning", "error"]

FindingRule = Literal[
    "domain_passes",
    "policy_useless",
    "weaker_than_recommended",
    "diagnosis_inconclusive",
    "idna_deviation",
    "plaintext_allowed",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExtendedError(_Model):
    """One EDNS Extended DNS Error (RFC 8914) from the resolver."""

    code: int
    name: str
    text: str = ""


class DnsLookup(_Model):
    """One query to the validating resolver, as Postfix would see it."""

    qname: str
    rdtype: str
    rcode: str
    """`NOERROR`, `NXDOMAIN`, `SERVFAIL`, …, or `TIMEOUT` when no server answered."""
    ad: bool
    security: Security
    ede: list[ExtendedError] = []
    answers: list[str] = []
    """Record data of the final answer RRset (after CNAME expansion)."""
    canonical_name: str
    cnames: list[str] = []
    """The CNAME chain followed, as `owner -> target`."""
    published: list[str] | None = None
    """On SERVFAIL: what the zone publishes, re-queried with CD=1 (not validated)."""
    error: str | None = None


class TlsaRecord(_Model):
    usage: int
    selector: int
    mtype: int
    data: str
    """Lower-case hex."""
    usable: bool
    """Usage 2/3, selector 0/1, matching type 0/1/2 (RFC 7672 §3.1.3)."""
    text: str


class TlsaResult(_Model):
    state: TlsaState
    base_domain: str
    """Where the records were found (or the first name tried); also the SNI name of the probes."""
    records: list[TlsaRecord] = []
    lookups: list[DnsLookup] = []


class CertificateInfo(_Model):
    depth: int
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    dns_names: list[str]
    key_type: str
    tlsa_3_1_1: str
    """SHA-256 of the DER SubjectPublicKeyInfo, hex: the data of a `3 1 1` record."""
    tlsa_3_0_1: str
    """SHA-256 of the DER certificate, hex: the data of a `3 0 1` record."""
    pkey_fingerprint: str
    """Postfix `pkey_fingerprint` (sha256, colon-separated upper-case hex) = `3 1 1` data."""
    cert_fingerprint: str
    """Postfix certificate `fingerprint` (sha256, colon-separated)."""
    der_b64: str


class SmtpProbe(_Model):
    port: int
    sni: str | None
    """The SNI name sent; None when none was sent."""
    protocols: str | None = None
    """The TLS versions the probe offered, in Postfix's grammar (`>=TLSv1.2` as mailcow's Postfix;
    `>=TLSv1` for the legacy probe)."""
    security_level: int | None = None
    """The OpenSSL security level of the probe: 1 as Postfix at the authenticating levels, 0 as
    Postfix at encrypt and may (and for the legacy probe)."""
    banner: str | None = None
    ehlo: list[str] = []
    starttls_offered: bool | None = None
    tls_version: str | None = None
    cipher: str | None = None
    chain: list[CertificateInfo] = []
    """Every certificate the server sent, in the order sent (depth 0 = leaf)."""
    failed_stage: Stage | None = None
    error: str | None = None
    duration_ms: int = 0


class AddressResult(_Model):
    address: str
    family: Literal["ipv4", "ipv6"]
    status: AddressStatus
    would_deliver: bool | None
    """Under mailcow's default `dane` policy; None when it could not be judged."""
    postfix_tls: PostfixTls | None = None
    detail: str
    matched: list[str] = []
    """TLSA records that matched, e.g. `3 1 1 ab12… at depth 0`."""
    pkix_names: list[str] = []
    """Names for which the chain validates against the CA bundle (what `verify`/`secure` need), judged
    on the chain sent without SNI (`probe_without_sni` when present)."""
    pkix_error: str | None = None
    probe: SmtpProbe | None = None
    """What Postfix sees at the level it uses under mailcow's default dane policy: with SNI = the TLSA
    base domain at the dane and encrypt (unusable TLSA) levels, without SNI at may."""
    probe_without_sni: SmtpProbe | None = None
    """A second probe without SNI, as Postfix connects under a fingerprint, verify, secure, encrypt or
    may override (mailcow sets no servername=); None when `probe` already sent no SNI."""
    probe_legacy: SmtpProbe | None = None
    """What the host can negotiate beyond mailcow's settings: made only when the TLS handshake failed
    under them, without SNI, allowing TLS 1.0/1.1 at OpenSSL security level 0, as Postfix negotiates
    under `encrypt protocols=>=TLSv1`."""

    @property
    def tried(self) -> bool:
        """Whether Postfix connects here at all (not past smtp_mx_address_limit)."""
        return self.status != "not-tried"

    @property
    def override_probe(self) -> SmtpProbe | None:
        """What Postfix sees under an override below the dane level: the chain sent without SNI."""
        return self.probe_without_sni or self.probe


class MxHost(_Model):
    name: str
    preference: int
    implicit: bool = False
    """True when the domain has no MX and the domain itself is the host (RFC 5321 §5.1)."""
    canonical_name: str
    dnssec: Security
    """Of the host's A/AAAA answers."""
    address_lookups: list[DnsLookup] = []
    postfix_level: PostfixLevel
    tlsa: TlsaResult | None = None
    status: HostStatus
    would_deliver: bool | None
    failure_class: FailureClass | None = None
    tlsa_3_1_1: str | None = None
    tlsa_3_0_1: str | None = None
    pkey_fingerprint: str | None = None
    """Of the leaf served by the first address that completed TLS."""
    explanation: str
    advice: list[str] = []
    addresses: list[AddressResult] = []

    @property
    def tried(self) -> bool:
        """Whether Postfix gets to this host (not past smtp_mx_address_limit or the host cap, and checked)."""
        return self.status not in ("not-tried", "not-checked")


class PolicyOption(_Model):
    policy: TlsPolicy
    parameters: str = ""
    reason: str = ""
    plaintext: bool = False
    """True when the policy lets mail go unencrypted to some host."""


class Recommendation(PolicyOption):
    alternatives: list[PolicyOption] = []
    """Weaker options that would also deliver, best first."""


class Diagnosis(_Model):
    schema_version: int = SCHEMA_VERSION
    domain: str
    verdict: Verdict
    failure_class: FailureClass | None
    recommended: Recommendation | None
    """The temporary override to apply now (blocked domains only)."""
    contingency: Recommendation | None = None
    """For degraded domains: the override to use if the working hosts go away and mail queues."""
    explanation: str
    resolver: str
    resolver_validates: bool | None
    """True when an answer proved DNSSEC validation (AD=1, or a bogus answer), False when the self-test
    was answered without AD and nothing proved it, None when it could not be told."""
    selftest: DnsLookup | None = None
    """The resolver self-test: DNSKEY of a zone known to be signed (`dns_selftest_name`)."""
    smtp_port: int
    mx: DnsLookup | None
    implicit_mx: bool = False
    null_mx: bool = False
    hosts: list[MxHost]
    checked_at: datetime
    duration_ms: int


class Finding(_Model):
    rule: FindingRule
    message: str
    severity: Severity
