"""What Postfix would do for each MX address under a given TLS policy override (dane.md §2.3).

Works on the stored `Diagnosis` data only, so it can be re-run on a request without new probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.diagnosis.models import AddressResult, MxHost, TlsPolicy

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

POLICIES: tuple[TlsPolicy, ...] = tuple(POLICY_STRENGTH)

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
            plaintext = bool(delivers) and _is_plaintext(policy, address)
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
    if not probe.chain:
        return False  # no STARTTLS, or the handshake failed: every TLS-mandatory level defers
    if policy == "encrypt":
        return True
    if policy == "fingerprint":
        wanted = {normalize_fingerprint(fp) for fp in parse_match(parameters) or []}
        leaf = probe.chain[0]
        return bool(
            wanted & {normalize_fingerprint(leaf.pkey_fingerprint), normalize_fingerprint(leaf.cert_fingerprint)}
        )
    names = [n.lower() for n in parse_match_names(parameters, policy)]
    return any(_strategy_matches(strategy, pkix, domain, host) for strategy in names for pkix in address.pkix_names)


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


def _is_plaintext(policy: TlsPolicy, address: AddressResult) -> bool:
    if policy == "none":
        return True
    if policy == "may":
        probe = address.override_probe
        return probe is None or not probe.chain
    return False
