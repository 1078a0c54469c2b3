"""Pure checks of an override request against a diagnosis, and the "recipient is fixed" test."""

from __future__ import annotations

from app.diagnosis.models import AddressResult, Diagnosis, Finding
from app.diagnosis.policy import POLICY_STRENGTH, TLS_VERSIONS, is_policy, simulate
from app.mailcow.policies import TlsPolicy


def assess_request(diagnosis: Diagnosis, policy: str, parameters: str) -> list[Finding]:
    """What is wrong with asking for `policy parameters` for this domain; [] when nothing is."""
    if not is_policy(policy):
        raise ValueError(f"unknown TLS policy {policy!r}; expected one of {', '.join(POLICY_STRENGTH)}")
    requested: TlsPolicy = policy  # type: ignore[assignment]
    if diagnosis.failure_class == "K" or diagnosis.verdict == "unknown":
        # Our own view is blind (no validating resolver, nothing probed): that says nothing about what
        # mailcow's resolver sees, so it must neither refuse nor bless the request.
        return [
            Finding(
                rule="diagnosis_inconclusive",
                message=f"the diagnosis of {diagnosis.domain} is inconclusive: {diagnosis.explanation}",
                severity="warning",
            )
        ]
    findings: list[Finding] = []
    if diagnosis.verdict == "ok":
        findings.append(
            Finding(
                rule="domain_passes",
                message=f"{diagnosis.domain} already takes mail under mailcow's default dane policy; "
                "no override is needed",
                severity="warning",
            )
        )
    useless = _why_useless(diagnosis, requested, parameters)
    if useless:
        findings.append(Finding(rule="policy_useless", message=useless, severity="error"))
    best = diagnosis.recommended or diagnosis.contingency
    if best is not None and POLICY_STRENGTH[requested] < POLICY_STRENGTH[best.policy]:
        plaintext = " and allows plaintext" if requested in ("none", "may") else ""
        params = f" {best.parameters}" if best.parameters else ""
        findings.append(
            Finding(
                rule="weaker_than_recommended",
                message=f"`{requested}` is weaker than the recommended `{best.policy}{params}`{plaintext}",
                severity="warning",
            )
        )
    return findings


def _why_useless(diagnosis: Diagnosis, policy: TlsPolicy, parameters: str) -> str | None:
    if diagnosis.failure_class == "F":
        return (
            f"{diagnosis.domain}'s MX lookup is DNSSEC-bogus: Postfix defers before TLS, so no TLS policy can "
            "help (fix DNSSEC, or a resolver negative trust anchor)"
        )
    if diagnosis.null_mx or not diagnosis.hosts:
        return f"{diagnosis.domain} has no MX host to deliver to; a TLS policy changes nothing"
    baseline = simulate("dane", "", diagnosis.domain, diagnosis.hosts)
    outcome = simulate(policy, parameters, diagnosis.domain, diagnosis.hosts)
    pairs = list(zip(baseline, outcome, strict=True))
    if diagnosis.verdict == "ok":
        broken = [after for before, after in pairs if before.delivers is True and after.delivers is False]
        if broken:
            where = ", ".join(sorted({o.host for o in broken}))
            return f"`{policy}` would stop delivery to {where}, which works today"
        return None
    fixed = [after for before, after in pairs if before.delivers is not True and after.delivers is True]
    if fixed:
        return None
    if all(o.delivers is None for before, o in pairs if before.delivers is not True):
        return None  # nothing known about the failing addresses (not probed): cannot call it useless
    return _useless_reason(diagnosis, policy, parameters)


def _useless_reason(diagnosis: Diagnosis, policy: TlsPolicy, parameters: str) -> str:
    failing = [
        (host, address) for host in diagnosis.hosts for address in host.addresses if address.would_deliver is not True
    ]
    if any(host.failure_class == "G" for host in diagnosis.hosts if host.would_deliver is not True) and not failing:
        return "the MX host address lookup fails (DNSSEC); no TLS policy can help"
    no_starttls = [a for _, a in failing if a.probe is not None and a.probe.starttls_offered is False]
    if no_starttls and policy not in ("none", "may"):
        return f"the failing hosts do not offer STARTTLS; `{policy}` requires TLS and still defers"
    legacy = sorted({v for _, a in failing if (v := _legacy_version(a)) is not None}, key=TLS_VERSIONS.index)
    if legacy and policy == "encrypt":
        requested = f"encrypt {parameters}".strip()
        return (
            f"the failing hosts speak only {' or '.join(legacy)}, which `{requested}` does not admit "
            f"(mailcow's floor is TLSv1.2): add protocols=>={legacy[0]}"
        )
    if legacy and policy not in ("none", "may"):
        return (
            f"the failing hosts speak only {' or '.join(legacy)}: Postfix with OpenSSL 3 cannot authenticate "
            f"TLS 1.0/1.1 ('legacy sigalg disallowed or unsupported'), so `{policy}` defers whatever protocols= says"
        )
    if policy in ("dane", "dane-only"):
        return f"`{policy}` keeps the TLSA check that fails today"
    if policy == "fingerprint":
        return "none of the match= fingerprints is the key a failing host serves"
    if policy in ("verify", "secure"):
        return f"the failing hosts' certificates do not pass the WebPKI check `{policy}` needs"
    return f"`{policy}` does not get mail to any failing host"


def _legacy_version(address: AddressResult) -> str | None:
    legacy = address.probe_legacy
    return legacy.tls_version if legacy is not None and legacy.chain else None


def is_clean(diagnosis: Diagnosis) -> bool:
    """True when mailcow's default dane policy would pass on every MX host (the override can go)."""
    if diagnosis.resolver_validates is not True or diagnosis.null_mx or not diagnosis.hosts:
        return False
    if diagnosis.failure_class in ("F", "K") or diagnosis.verdict == "unknown":
        return False
    delivered = False
    for host in diagnosis.hosts:
        if not host.tried:
            continue  # Postfix never gets to it (smtp_mx_address_limit, or past the host cap)
        if not host.addresses:
            return False
        host_passes = any(address.would_deliver is True for address in host.addresses)
        for address in host.addresses:
            if address.would_deliver is True:
                delivered = True
            elif address.status == "unreachable" or not address.tried:
                # Unreachable addresses are not a TLS matter and would fail under any override;
                # Postfix never tries the ones past smtp_mx_address_limit.
                continue
            elif address.status in ("not-probed", "not-probed-reserved") and host_passes:
                # No route from the checker (IPv6), or not probed at all: the host's other address
                # shows the default policy passes, and that one is not a verdict against it.
                continue
            else:
                return False
    return delivered
