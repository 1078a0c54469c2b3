"""Postfix's own rules, as pure functions of the facts a diagnosis gathered (no network here).

Where the DANE verdict is made: what level Postfix's `dane` turns into for a host (`postfix_level`),
what it does with one address (`judge_address`), which addresses it tries at all (`plan_addresses`),
the failure class of a host (`host_class`), the domain verdict (`domain_verdict`), whether the resolver
validates (`resolver_validates`), and the least weakening override that gets mail through
(`recommend`). engine.py gathers the facts (DNS, SMTP probes) and calls these.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Literal

from app.diagnosis.certs import DaneMatch
from app.diagnosis.models import (
    AddressResult,
    AddressStatus,
    DnsLookup,
    FailureClass,
    MxHost,
    PolicyOption,
    PostfixLevel,
    PostfixTls,
    Recommendation,
    SmtpProbe,
    TlsaResult,
    Verdict,
)
from app.diagnosis.policy import MAILCOW_PROTOCOLS, POLICY_STRENGTH, TLS_VERSIONS, admitted_protocols, simulate

_STALE_CLASSES: frozenset[FailureClass | None] = frozenset({"A", "A'", "H"})
_NO_ROUTE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})

Family = Literal["ipv4", "ipv6"]
_FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
Tried = Literal["yes", "maybe", "no"]
"""Does Postfix try an address: always, in some deliveries (equal-preference order is random), never."""


def resolver_validates(selftest: DnsLookup | None, mx: DnsLookup, hosts: Sequence[MxHost]) -> bool | None:
    """Does the resolver validate? True once any answer proves it, False when the self-test says it
    does not and nothing else proves it, None when that cannot be told.

    Proof is AD=1 or a bogus answer (a SERVFAIL for a DNSSEC reason: only a validating resolver
    gives one) on any query: the self-test, the MX, a host's addresses or its TLSA records. A
    self-test answered without AD (NOERROR or NXDOMAIN for a name known to be signed) says the
    resolver does not validate; a self-test that fails otherwise (SERVFAIL, REFUSED, no answer)
    decides nothing."""
    lookups = [mx, *(lk for h in hosts for lk in (*h.address_lookups, *(h.tlsa.lookups if h.tlsa else [])))]
    if selftest is not None:
        lookups.append(selftest)
    if any(lk.ad or lk.security == "bogus" for lk in lookups) or any(h.dnssec == "secure" for h in hosts):
        return True
    if selftest is not None and selftest.rcode in ("NOERROR", "NXDOMAIN"):
        return False
    return None


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


def judge_address(
    level: PostfixLevel,
    tlsa: TlsaResult,
    probe: SmtpProbe,
    dane: DaneMatch | None,
    mx_secure: bool,
    family: str,
) -> tuple[AddressStatus, bool | None, PostfixTls | None]:
    """Postfix's outcome for one address at the effective level (dane.md §1.1 and §2.2)."""
    if level == "defer":
        return "tlsa-lookup-error", False, None
    if probe.failed_stage == "connect":
        if family == "ipv6" and _no_route(probe.error):
            return "not-probed", None, None
        return "unreachable", False, None
    if probe.failed_stage in ("banner", "ehlo"):
        return "smtp-error", False, None
    opportunistic: AddressStatus = "dane-not-applicable" if tlsa.state in ("not-applicable", "insecure") else "no-tlsa"
    if not probe.chain:
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


def postfix_level(tlsa: TlsaResult) -> PostfixLevel:
    if tlsa.state == "error":
        return "defer"
    if tlsa.state == "usable":
        return "dane"
    if tlsa.state == "unusable":
        return "encrypt"
    return "may"


def host_class(
    level: PostfixLevel, tlsa: TlsaResult, checks: Sequence[tuple[AddressResult, DaneMatch | None]]
) -> FailureClass | None:
    failing = next((result for result, _ in checks if result.would_deliver is False), None)
    if failing is not None:
        status = failing.status
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
    if level == "defer" and tlsa.state == "error":
        return "E"
    if level == "may":
        return "D" if tlsa.state in ("not-applicable", "insecure") else "J"
    if level == "encrypt":
        return "C"
    passing = [dane for _, dane in checks if dane is not None and dane.passed]
    if any(d.leaf_expired or not d.leaf_name_ok for d in passing if d.matched_ee):
        return "I"
    if any(result.postfix_tls == "Trusted" for result, _ in checks):
        return "D'"
    return None


def domain_verdict(
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


def recommend(
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
    legacy = _legacy_version(hosts)
    if legacy is not None:
        # After bare `encrypt` (the sort is stable): lowering mailcow's protocol floor is the last resort.
        options.append(
            PolicyOption(
                policy="encrypt",
                parameters=f"protocols=>={legacy}",
                reason=f"legacy {legacy}: encrypted, not authenticated; no fingerprint or verify override "
                "works, as Postfix with OpenSSL 3 cannot authenticate TLS 1.0/1.1; ask the recipient to "
                "upgrade to TLS 1.2 or later",
            )
        )
    return sorted(options, key=lambda o: -POLICY_STRENGTH[o.policy])


def _legacy_version(hosts: Sequence[MxHost]) -> str | None:
    """The oldest TLS version below mailcow's floor that a host negotiated in the legacy probe."""
    floor = admitted_protocols(MAILCOW_PROTOCOLS)
    spoken = {
        probe.tls_version
        for h in hosts
        for a in h.addresses
        if (probe := a.probe_legacy) is not None and probe.chain and probe.tls_version in TLS_VERSIONS
    }
    below = sorted((v for v in spoken if v not in floor), key=TLS_VERSIONS.index)
    return below[0] if below else None


def any_delivers(states: Sequence[bool | None]) -> bool | None:
    if any(s is True for s in states):
        return True
    if states and all(s is False for s in states):
        return False
    return None


def _no_route(error: str | None) -> bool:
    text = (error or "").lower()
    return any(word in text for word in ("unreachable", "not available", "address family")) or any(
        f"[errno {n}]" in text for n in _NO_ROUTE_ERRNOS
    )
