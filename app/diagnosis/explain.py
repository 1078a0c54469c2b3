"""Human sentences for a diagnosis: what Postfix will do, why, and what would fix it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from app.diagnosis.certs import DaneMatch
from app.diagnosis.models import (
    AddressResult,
    DnsLookup,
    FailureClass,
    HostStatus,
    MxHost,
    PostfixLevel,
    Recommendation,
    SmtpProbe,
    TlsaResult,
    Verdict,
)
from app.diagnosis.resolver import describe_failure

NO_TLS_POLICY_HELPS = "No TLS policy can help"


def address_detail(
    status: HostStatus,
    level: PostfixLevel,
    tlsa: TlsaResult,
    probe: SmtpProbe,
    dane: DaneMatch | None,
    host: str,
    legacy: SmtpProbe | None = None,
) -> str:
    leaf = probe.chain[0] if probe.chain else None
    tls = f" ({probe.tls_version}, {probe.cipher})" if probe.tls_version else ""
    if status == "pass":
        return f"{dane.detail if dane else 'DANE match'}{tls}"
    if status == "tlsa-mismatch":
        if leaf and pins_certificates_only(tlsa):
            # The records pin a whole certificate: a re-issue breaks them even when the key stays.
            return (
                f"the served certificate (3 0 1 {leaf.tlsa_3_0_1}) is not the one the `3 0 1` records at "
                f"_25._tcp.{tlsa.base_domain} pin: the certificate was re-issued (its key may be unchanged; "
                "these records pin the whole certificate)"
            )
        served = f"the served key (3 1 1 {leaf.tlsa_3_1_1})" if leaf else "the served certificate"
        extra = f"; {dane.detail}" if dane and dane.detail else ""
        return f"{served} matches no usable TLSA record at _25._tcp.{tlsa.base_domain}{extra}"
    if status in ("name-mismatch", "cert-expired", "chain-invalid"):
        return dane.detail if dane else status
    if status == "starttls-missing":
        return (
            "the server does not offer STARTTLS, but its TLSA records make TLS mandatory "
            "(Postfix: 4.7.4 'TLS is required, but was not offered')"
        )
    if status == "tlsa-lookup-error":
        lookup = tlsa.lookups[-1] if tlsa.lookups else None
        why = describe_failure(lookup) if lookup else "lookup failed"
        return (
            f"TLSA lookup for _25._tcp.{tlsa.base_domain} failed ({why}): Postfix defers with 4.7.5 'TLSA lookup error'"
        )
    if status == "handshake-failed" and legacy is not None and legacy.chain:
        fallback = (
            "Postfix retries in plaintext"
            if level == "may"
            else ("Postfix defers (4.7.5 'Cannot start TLS: handshake failure')")
        )
        return (
            f"the host speaks only {legacy.tls_version} ({legacy.cipher}, seen with TLS 1.0/1.1 allowed); "
            f"mailcow's Postfix requires TLSv1.2 or later (smtp_tls_mandatory_protocols = >=TLSv1.2), so "
            f"the handshake fails ({probe.error}) and {fallback}"
        )
    if status in ("unreachable", "smtp-error", "handshake-failed"):
        stage = f"{probe.failed_stage}: " if probe.failed_stage else ""
        fallback = "; at this level Postfix retries in plaintext" if level == "may" else ""
        return f"{stage}{probe.error or status}{fallback}"
    if status == "not-probed":
        return f"not probed: no route from the checker ({probe.error})"
    plain = " and delivers in plaintext (no STARTTLS)" if probe.starttls_offered is False else tls
    if status == "no-tlsa":
        return f"no TLSA records (secure denial): Postfix uses opportunistic TLS{plain}"
    if status == "dane-not-applicable":
        return f"DNSSEC does not cover {host} or its TLSA records, so DANE does not apply: opportunistic TLS{plain}"
    if status == "tlsa-unusable":
        return f"no TLSA record is usable for SMTP: Postfix falls back to mandatory unauthenticated TLS{tls}"
    return status


def pins_certificates_only(tlsa: TlsaResult) -> bool:
    """Every usable record is DANE-EE with selector 0: they pin whole certificates, not keys."""
    usable = [r for r in tlsa.records if r.usable]
    return bool(usable) and all(r.usage == 3 and r.selector == 0 for r in usable)


def host_explanation(
    host: str,
    level: PostfixLevel,
    tlsa: TlsaResult | None,
    status: HostStatus,
    addresses: Sequence[AddressResult],
    mx_secure: bool,
    lookups: Sequence[DnsLookup] = (),
) -> str:
    if status == "host-lookup-error":
        failed = next((lk for lk in lookups if lk.security in ("bogus", "error")), None)
        why = describe_failure(failed) if failed else "lookup failed"
        kind = "fails DNSSEC validation" if failed and failed.security == "bogus" else "fails"
        return f"{host}: the address lookup {kind} ({why}); Postfix cannot use this host"
    if status == "no-address":
        return f"{host}: no A/AAAA records; Postfix cannot use this host"
    considered = [a for a in addresses if a.tried]
    if considered and all(a.status == "not-probed" and a.probe is None for a in considered):
        return f"{host}: {considered[0].detail}"
    failing = [a for a in addresses if a.would_deliver is False]
    if failing:
        return f"{host}: {failing[0].address}: {failing[0].detail}"
    if addresses:
        first = addresses[0]
        if first.status == "pass":
            trust = "Verified" if mx_secure else "Trusted (the MX RRset is not DNSSEC-signed)"
            return f"{host}: passes DANE ({', '.join(first.matched)}); Postfix logs '{trust}'"
        return f"{host}: {first.detail}"
    return f"{host}: {status}"


def host_advice(tlsa: TlsaResult, addresses: Sequence[AddressResult], danes: Sequence[DaneMatch | None]) -> list[str]:
    """Operational advice for the recipient (dane.md §2.1 step 6)."""
    advice: list[str] = []
    usable = [r for r in tlsa.records if r.usable]
    leaves = {a.probe.chain[0].tlsa_3_1_1: a.probe.chain[0] for a in addresses if a.probe and a.probe.chain}
    if tlsa.state == "not-applicable" and tlsa.records:
        advice.append(
            f"TLSA records are published at _25._tcp.{tlsa.base_domain}, but the host's zone is not "
            "DNSSEC-signed, so senders ignore them: sign the zone or remove them"
        )
    if tlsa.state == "usable":
        ee = [r for r in usable if r.usage == 3]
        ta = [r for r in usable if r.usage == 2]
        if len(ee) == 1 and not ta:
            advice.append(
                "only one DANE-EE record: publish the next key as a second `3 1 1` record before every "
                "key change (rollover scheme '3 1 1 current + 3 1 1 next')"
            )
        if any(r.usage == 3 and r.selector == 0 for r in usable):
            advice.append("`3 0 1`-style records pin the whole certificate and break on every renewal; use `3 1 1`")
        digests_256 = [r for r in usable if r.mtype == 1]
        digests_512 = {(r.usage, r.selector) for r in usable if r.mtype == 2}
        if any((r.usage, r.selector) in digests_512 for r in digests_256):
            advice.append(
                "SHA2-512 records are present, so Postfix ignores the SHA2-256 records of the same usage and "
                "selector (digest algorithm agility, RFC 7671 §9)"
            )
        published = {r.data for r in tlsa.records}
        for digest, leaf in leaves.items():
            if not any(a.status == "tlsa-mismatch" for a in addresses):
                continue
            if pins_certificates_only(tlsa):
                advice.append(
                    "the served certificate is not in the TLSA RRset (it was re-issued); `3 1 1 "
                    f"{digest}` matches its key and survives every re-issue that keeps the key"
                )
                continue
            where = "appears in" if digest in published or leaf.tlsa_3_0_1 in published else "is not in"
            advice.append(f"the served key {where} the TLSA RRset; the record that would match it is `3 1 1 {digest}`")
        for dane in danes:
            if dane and dane.passed and any(m.startswith("2 ") and "depth 1" in m for m in dane.matched):
                chain = next((a.probe.chain for a in addresses if a.probe and len(a.probe.chain) > 1), [])
                if chain and chain[1].subject != chain[1].issuer:
                    advice.append(
                        "the DANE-TA record pins an intermediate CA: it breaks when the CA switches intermediates"
                    )
                break
        for dane in danes:
            if dane and dane.passed and dane.matched_ee and dane.leaf_expired:
                advice.append("the leaf certificate is expired; DANE-EE ignores dates, but renew it (class I)")
                break
        for dane in danes:
            if dane and dane.passed and dane.matched_ee and not dane.leaf_name_ok:
                advice.append(
                    "the leaf names neither the MX host nor the domain; DANE-EE ignores names, but WebPKI senders "
                    "will not accept it (class I)"
                )
                break
    for address in addresses:
        legacy = address.probe_legacy
        if legacy and legacy.chain and legacy.tls_version in ("TLSv1", "TLSv1.1", "SSLv3"):
            advice.append(
                f"{address.address} speaks only {legacy.tls_version}; mailcow requires TLSv1.2 or later: enable "
                "TLS 1.2 and 1.3 on the server"
            )
    return list(dict.fromkeys(advice))


def domain_explanation(
    *,
    resolver_validates: bool | None,
    selftest: DnsLookup | None = None,
    deadline: float | None = None,
    notes: Sequence[str] = (),
    **facts: Any,
) -> str:
    """One paragraph: the verdict, the cause as Postfix would log it, and the fix or the real options."""
    if deadline is not None and facts["failure_class"] != "K":
        text = _deadline_sentences(facts["domain"], deadline, facts["hosts"])
    else:
        text = _domain_sentences(**facts)
    if resolver_validates is None:
        why = f"failed ({describe_failure(selftest)})" if selftest is not None else "got no answer"
        text += (
            f" Note: the resolver's DNSSEC self-test {why} and no other answer proved validation (AD bit or a "
            "DNSSEC failure), so validation could not be confirmed."
        )
    for note in notes:
        text += f" {note}"
    return text


def _deadline_sentences(domain: str, deadline: float, hosts: Sequence[MxHost]) -> str:
    text = (
        f"{domain}: the diagnosis did not finish within its deadline of {deadline:g} s (a slow resolver or "
        "slow MX hosts), so the verdict is unknown and no override is recommended."
    )
    done = [h for h in hosts if h.status != "not-checked" and h.would_deliver is not None]
    if done:
        text += " Finished before the deadline: " + "; ".join(h.explanation for h in done) + "."
    return text


def _domain_sentences(
    *,
    domain: str,
    verdict: Verdict,
    failure_class: FailureClass | None,
    hosts: Sequence[MxHost],
    mx: DnsLookup,
    null_mx: bool,
    recommended: Recommendation | None,
    contingency: Recommendation | None,
    resolver: str,
) -> str:
    if failure_class == "K":
        return (
            f"The resolver ({resolver}) does not validate DNSSEC (no AD bit, not even for the self-test zone), "
            f"so DANE is silently off and nothing can be concluded about {domain}. Fix the sender-side "
            "resolver; this is not a TLS-override matter."
        )
    if failure_class == "F":
        return (
            f"The MX lookup for {domain} fails DNSSEC validation ({describe_failure(mx)}), so Postfix cannot "
            f"even find the MX hosts and defers every message (4.4.3 'Host or domain name not found'). "
            f"{NO_TLS_POLICY_HELPS}: none, may and encrypt all still defer. The real options: the recipient "
            f"fixes its DNSSEC (re-sign the zone, fix the DS); or a negative trust anchor "
            f'`domain-insecure: "{domain}."` in mailcow\'s data/conf/unbound/unbound.conf followed by a restart '
            f"of unbound-mailcow, which turns DNSSEC off for that zone; or a transport to a literal [IP]. "
            f"Both are outside mailcow's TLS-policy API."
        )
    if mx.rcode == "TIMEOUT":
        return f"The resolver ({resolver}) did not answer the MX query for {domain}: {mx.error}."
    if mx.rcode == "NXDOMAIN":
        return f"{domain} does not exist (NXDOMAIN); not a TLS matter."
    if mx.rcode != "NOERROR":
        return f"The MX lookup for {domain} fails ({describe_failure(mx)}); Postfix defers. Not a TLS-policy matter."
    if null_mx:
        return f"{domain} publishes a null MX: it accepts no mail. Not a TLS matter."
    # Hosts Postfix never gets to (smtp_mx_address_limit) or that were not checked are left out.
    hosts = [h for h in hosts if h.tried] or hosts
    failing = [h for h in hosts if h.would_deliver is not True or any(a.would_deliver is False for a in h.addresses)]
    first = failing[0] if failing else (hosts[0] if hosts else None)
    count = f"{len(hosts)} MX host" + ("s" if len(hosts) != 1 else "")
    if verdict == "ok":
        reason = _ok_reason(failure_class, first)
        # A host that lost one address family (a bogus AAAA beside a secure A) still takes mail: say so.
        lost = [
            f" Note: {h.name}'s {lk.rdtype} lookup {'fails DNSSEC validation' if lk.security == 'bogus' else 'failed'} "
            f"({describe_failure(lk)}); Postfix uses its other addresses."
            for h in hosts
            if h.addresses
            for lk in h.address_lookups
            if lk.security in ("bogus", "error")
        ]
        return f"{domain}: all {count} would take mail under mailcow's default dane policy. {reason}{''.join(lost)}"
    if first is None:
        return f"{domain}: no MX hosts to check."
    fix = _fix_sentence(recommended)
    if verdict == "degraded":
        lead = (
            "stale or mismatching DANE records on some MX hosts or addresses"
            if failure_class == "A''"
            else (f"class {failure_class}" if failure_class else "a problem")
        )
        extra = ""
        if contingency:
            extra = (
                f" If the working hosts go down and mail queues, use `{contingency.policy}"
                f"{' ' + contingency.parameters if contingency.parameters else ''}`."
            )
        # A host that works on one address and fails on another (a dual-stack host with a stale key on
        # one family) is named with its addresses: Postfix moves on to the next address, not the next host.
        skipped = [_where(h, lambda a: a.would_deliver is False) for h in failing]
        used = [_where(h, lambda a: a.would_deliver is True) for h in hosts if h.would_deliver is True]
        return (
            f"{domain}: degraded ({lead}): {first.explanation}. Postfix skips {', '.join(skipped)} and delivers "
            f"via {', '.join(used)}; no override is needed now.{extra}"
        )
    if verdict == "unknown":
        return (
            f"{domain}: could not be judged completely: {first.explanation}. "
            "Addresses that were not probed or not reachable from here leave the outcome open."
        )
    cause = _blocked_cause(failure_class, first)
    if failure_class == "G":
        return (
            f"{domain}: blocked. {cause} {NO_TLS_POLICY_HELPS}: Postfix fails before TLS. The real options: "
            "the recipient fixes the DNSSEC of that zone, or a negative trust anchor (`domain-insecure:`) in "
            "mailcow's unbound, or a transport to a literal [IP]; all outside mailcow's TLS-policy API."
        )
    if recommended is None:
        unprobed = [a.address for h in hosts for a in h.addresses if a.probe is None or a.status == "not-probed"]
        if unprobed:
            return (
                f"{domain}: blocked. {cause} Which override would help cannot be worked out: "
                f"{', '.join(unprobed)} could not be probed from here."
            )
        return f"{domain}: blocked. {cause} No TLS policy override would get mail through."
    return f"{domain}: blocked. {cause} {fix}"


def _where(host: MxHost, picked: Callable[[AddressResult], bool]) -> str:
    """The host, or the host with the addresses `picked` when only some of its addresses are."""
    chosen = [a.address for a in host.addresses if a.tried and picked(a)]
    if not chosen or len(chosen) == len([a for a in host.addresses if a.tried]):
        return host.name
    return f"{host.name} [{', '.join(chosen)}]"


def _ok_reason(failure_class: FailureClass | None, host: MxHost | None) -> str:
    reasons: dict[str, str] = {
        "C": "TLSA records exist but none is usable for SMTP (usages 0/1, an unknown selector or matching "
        "type, or a digest of the wrong length), so Postfix uses mandatory unauthenticated TLS (encrypt); "
        "nothing to override.",
        "D": "DNSSEC does not cover the MX host (unsigned zone), so DANE does not apply and Postfix uses "
        "opportunistic TLS; nothing to override.",
        "D'": "The MX RRset is not DNSSEC-signed, but the MX hosts are signed and pass DANE; Postfix logs "
        "'Trusted' instead of 'Verified'; nothing to override.",
        "I": "DANE-EE matches although the leaf certificate is expired or does not name the MX host or the "
        "domain; usage 3 ignores both, so nothing to override, but senders without DANE may refuse it.",
        "J": "No TLSA records (securely denied), so Postfix uses opportunistic TLS; nothing to override.",
    }
    if failure_class and failure_class in reasons:
        return reasons[failure_class]
    return "Every host passes DANE; nothing to override." if host else ""


def _blocked_cause(failure_class: FailureClass | None, host: MxHost) -> str:
    causes: dict[str, str] = {
        "A": "The served key matches none of the TLSA records (stale TLSA after a key change); Postfix "
        "defers with 4.7.5 'Server certificate not verified'.",
        "A'": "The TLSA records pin the whole certificate (`3 0 1`) and the certificate was re-issued; Postfix "
        "defers with 4.7.5 'Server certificate not verified'.",
        "B": "Usable TLSA records make TLS mandatory, but STARTTLS is not offered; Postfix defers with 4.7.4 "
        "'TLS is required, but was not offered'.",
        "E": "The TLSA lookup fails (bogus or failing RRset); Postfix defers with 4.7.5 'TLSA lookup error'. "
        "The dane and dane-only policies do not help.",
        "G": "The MX host's address lookup fails DNSSEC validation, so Postfix cannot connect at all.",
        "H": "The DANE-TA check fails (issuer, name or dates); Postfix defers with 4.7.5 'Server certificate "
        "not verified'.",
    }
    prefix = causes.get(failure_class or "", "")
    return f"{prefix} Details: {host.explanation}." if prefix else f"{host.explanation}."


def _fix_sentence(recommended: Recommendation | None) -> str:
    if recommended is None:
        return ""
    params = f" {recommended.parameters}" if recommended.parameters else ""
    sentence = f"Temporary fix: `{recommended.policy}{params}` ({recommended.reason})."
    if recommended.plaintext:
        sentence += " WARNING: mail will go unencrypted; prefer waiting for the recipient to fix it."
    return sentence
