"""What Postfix would do for each MX address under a given TLS policy override (dane.md §2.3).

Works on the stored `Diagnosis` data only, so it can be re-run on a request without new probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.diagnosis.models import AddressResult, MxHost
from app.mailcow.policies import TlsPolicy

POLICY_STRENGTH: dict[TlsPolicy, int] = {
    "none": 0,
    "may": 1,
    "encrypt": 2,
    "dane": 3,
    "verify": 4,
    "secure": 5,
    "dane-only": 5,
    "fingerprint": 6,
}
"""How much a policy protects: plaintext allowed < unauthenticated TLS < opportunistic DANE <
WebPKI < mandatory DANE or domain-matched WebPKI < a pinned key. Used for "weaker than"."""

_PLAINTEXT_POLICIES = frozenset({"none", "may"})


def is_policy(value: str) -> bool:
    return value in POLICY_STRENGTH


def parse_match(parameters: str) -> list[str] | None:
    """The `match=` attribute of a policy-table entry, or None when absent."""
    for token in parameters.split():
        key, sep, value = token.partition("=")
        if sep and key.strip().lower() == "match":
            return [v for v in value.strip().split("|") if v]
    return None


def normalize_fingerprint(value: str) -> str:
    return value.replace(":", "").strip().upper()


TLS_VERSIONS: tuple[str, ...] = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
"""Oldest first, as Postfix names them."""
MAILCOW_PROTOCOLS = ">=TLSv1.2"
"""mailcow's smtp_tls_protocols and smtp_tls_mandatory_protocols: what a policy without `protocols=` gets."""


def admitted_protocols(spec: str) -> frozenset[str]:
    """The TLS versions a Postfix protocols value enables (tls_proto_mask_lims): `name` (only these),
    `!name` (not this), `>=name` and `<=name` (bounds), separated by `:`, `,` or white space."""
    include: set[str] = set()
    exclude: set[str] = set()
    low, high = 0, len(TLS_VERSIONS) - 1
    for token in spec.replace(",", ":").replace(" ", ":").split(":"):
        if not token:
            continue
        for prefix in (">=", "<=", "!", ""):
            name = token.removeprefix(prefix)
            if token.startswith(prefix) and name in TLS_VERSIONS:
                index = TLS_VERSIONS.index(name)
                if prefix == ">=":
                    low = max(low, index)
                elif prefix == "<=":
                    high = min(high, index)
                elif prefix == "!":
                    exclude.add(name)
                else:
                    include.add(name)
                break
    enabled = include or set(TLS_VERSIONS)
    return frozenset(v for i, v in enumerate(TLS_VERSIONS) if v in enabled and v not in exclude and low <= i <= high)


def parse_protocols(parameters: str) -> frozenset[str]:
    """The versions a policy-table entry admits: its `protocols=`, else mailcow's `>=TLSv1.2`."""
    for token in parameters.split():
        key, sep, value = token.partition("=")
        if sep and key.strip().lower() == "protocols":
            return admitted_protocols(value)
    return admitted_protocols(MAILCOW_PROTOCOLS)


@dataclass(frozen=True)
class AddressOutcome:
    host: str
    address: str
    delivers: bool | None
    plaintext: bool = False


def simulate(policy: TlsPolicy, parameters: str, domain: str, hosts: Sequence[MxHost]) -> list[AddressOutcome]:
    """Per MX address: would Postfix deliver with this policy as the override for `domain`?"""
    outcomes: list[AddressOutcome] = []
    for host in hosts:
        if not host.tried:
            continue  # Postfix never gets to it (smtp_mx_address_limit), or we did not check it
        if not host.addresses:
            # Address lookup failed (incl. DNSSEC-bogus, class G) or the host does not exist: no TLS
            # policy gets past this.
            outcomes.append(AddressOutcome(host.name, "", False))
            continue
        for address in host.addresses:
            if not address.tried:
                continue
            delivers = _delivers(policy, parameters, domain, host, address)
            plaintext = bool(delivers) and _is_plaintext(policy, address, parameters)
            outcomes.append(AddressOutcome(host.name, address.address, delivers, plaintext))
    return outcomes


def _delivers(policy: TlsPolicy, parameters: str, domain: str, host: MxHost, address: AddressResult) -> bool | None:
    if policy == "dane":
        return address.would_deliver
    if policy == "dane-only":
        return address.would_deliver if host.postfix_level == "dane" else False
    # Every other policy connects without SNI (mailcow sets no servername=).
    probe = address.override_probe
    if probe is None:
        return None
    if probe.failed_stage in ("connect", "banner"):
        return False
    if policy in _PLAINTEXT_POLICIES:
        return True
    if policy == "encrypt":
        return encrypts(address, parameters)
    if not probe.chain:
        # No STARTTLS, or the handshake failed under mailcow's settings. Lowering `protocols=` does not
        # help an authenticating level: OpenSSL 3 refuses the SHA-1 signatures of TLS 1.0/1.1 there
        # ("legacy sigalg disallowed or unsupported", seen with posttls-finger in the lab).
        return False
    admitted = _version_admitted(probe.tls_version, parse_protocols(parameters))
    if admitted is not True:
        return admitted
    if policy == "fingerprint":
        wanted = {normalize_fingerprint(fp) for fp in parse_match(parameters) or []}
        leaf = probe.chain[0]
        return bool(
            wanted & {normalize_fingerprint(leaf.pkey_fingerprint), normalize_fingerprint(leaf.cert_fingerprint)}
        )
    names = [n.lower() for n in parse_match_names(parameters, policy)]
    return any(_strategy_matches(strategy, pkix, domain, host) for strategy in names for pkix in address.pkix_names)


def encrypts(address: AddressResult, parameters: str) -> bool | None:
    """Does TLS come up at the encrypt (or may) level with these parameters? Postfix negotiates there
    at OpenSSL security level 0, so what the probes saw decides, within the admitted versions."""
    admitted = parse_protocols(parameters)
    probe = address.override_probe
    if probe is not None and probe.chain:
        return _version_admitted(probe.tls_version, admitted)
    legacy = address.probe_legacy
    if legacy is None or not legacy.chain:
        return False
    return _version_admitted(legacy.tls_version, admitted)


def _version_admitted(version: str | None, admitted: frozenset[str]) -> bool | None:
    """The host negotiated `version`, the best it has within what the probe offered. None when that
    version is not admitted but an older one is: whether the host also speaks it is unknown."""
    if version is None or version in admitted:
        # None: a probe stored before versions were judged here; it negotiated within mailcow's floor.
        return True
    if version in TLS_VERSIONS and any(TLS_VERSIONS.index(v) < TLS_VERSIONS.index(version) for v in admitted):
        return None
    return False


def parse_match_names(parameters: str, policy: TlsPolicy) -> list[str]:
    """`verify`/`secure` match strategies; the defaults are Postfix's `smtp_tls_*_cert_match`."""
    values = parse_match(parameters)
    if values:
        return [name for value in values for name in value.split(":") if name]
    return ["hostname"] if policy == "verify" else ["nexthop", "dot-nexthop"]


def _strategy_matches(strategy: str, name: str, domain: str, host: MxHost) -> bool:
    if strategy == "hostname":
        return name in (host.name, host.canonical_name)
    if strategy == "nexthop":
        return name == domain
    if strategy == "dot-nexthop":
        return name.endswith("." + domain)
    if strategy.startswith("."):
        return name.endswith(strategy)
    return name == strategy.rstrip(".")


def _is_plaintext(policy: TlsPolicy, address: AddressResult, parameters: str) -> bool:
    if policy == "none":
        return True
    if policy == "may":
        return encrypts(address, parameters) is not True
    return False
