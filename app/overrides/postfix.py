"""What Postfix will accept: destinations it looks up, and TLS policy attributes per level.

mailcow stores almost anything (see shared/mailcow-api.md §3, §8), but Postfix only ever looks up the
next-hop domain or a verbatim `[host]:port`, and an invalid attribute makes Postfix defer *all* mail to
that destination. So both are checked here, strictly, before a request is accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from app.diagnosis.policy import POLICY_STRENGTH
from app.mailcow.policies import POLICIES

__all__ = [
    "POLICIES",
    "POLICY_STRENGTH",
    "PolicyInputError",
    "mx_domain_of",
    "normalise_destination",
    "normalise_parameters",
]


_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_CIPHER_GRADES = {"low", "medium", "high"}
# `null` (no encryption at all) and `export` (broken since the 1990s) are valid Postfix, but no DANE
# workaround needs them: refused rather than passed to review as a harmless-looking parameter.
_REFUSED_GRADES = {"null", "export"}
# Postfix's tls_proto_mask_lims() knows exactly: `>=version`, `<=version`, `!name` and `name`; anything
# else (`>TLSv1.2`, `>=!TLSv1.2`) makes the whole policy invalid and Postfix defers all mail.
_PROTOCOL_NAME = r"(?:SSLv2|SSLv3|TLSv1|TLSv1\.1|TLSv1\.2|TLSv1\.3)"
_PROTOCOL = re.compile(rf"^(?:[<>]={_PROTOCOL_NAME}|!?{_PROTOCOL_NAME})$")
_CIPHER_NAME = re.compile(r"^!?[A-Za-z0-9+_.-]+$")
_HEX_DIGEST = re.compile(r"^(?:[0-9A-Fa-f]{2}:?)+$")
_DIGEST_BYTES = {16, 20, 28, 32, 48, 64}
_MATCH_STRATEGIES = {"nexthop", "dot-nexthop", "hostname"}


class PolicyInputError(ValueError):
    """A destination or parameter string Postfix would not use; `field` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _domain(name: str, field: str) -> str:
    if not name or any(ch.isspace() for ch in name):
        raise PolicyInputError(field, "must be a domain name without spaces")
    if "@" in name or "*" in name:
        raise PolicyInputError(field, "must be a domain, not an address or a wildcard: Postfix never looks those up")
    # IDNA2008 A-labels (UTS #46 non-transitional): `straße.example` is `xn--strae-oqa.example`. Why this
    # form: Postfix looks smtp_tls_policy_maps up by the next-hop destination exactly as the message
    # carries it, with no IDNA conversion (policy_create() in src/smtp/smtp_tls_policy.c queries
    # `iter->dest`); it converts names to A-labels only for DNS, and since 3.2 non-transitionally unless
    # `enable_idna2003_compatibility = yes` (src/util/midna_domain.c, postconf(5); vdukhovni/postfix).
    # mailcow runs Postfix with `smtputf8_enable = no` (data/conf/postfix/main.cf), so the recipient domain
    # arrives as the A-label the sender's software made: this form from IDNA2008 software (and from
    # Postfix itself), `strasse.example` from IDNA2003/transitional software — which is also what
    # mailcow's UI stores for `straße.example`. That form counts as a conflict (app.mailcow.dest) and the
    # request says which form it covers (finding `idna_deviation`, app.overrides.evidence).
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise PolicyInputError(field, f"is not a valid domain name ({exc})") from exc
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2:
        raise PolicyInputError(
            field, "must be a fully qualified domain name (at least two labels, at most 253 characters)"
        )
    for label in labels:
        if not _LABEL.match(label):
            raise PolicyInputError(field, f"label {label!r} is not a valid host name label")
    if labels[-1].isdigit():
        raise PolicyInputError(field, "top-level label cannot be numeric")
    return ascii_name


def _bracketed_host(inner: str, field: str) -> str:
    # Postfix's next-hop parser (host_port()) takes an IPv6 address both as [2001:db8::1] and as
    # [ipv6:2001:db8::1]; the policy is looked up by the next hop exactly as written, so the form given is kept.
    prefix = "ipv6:" if inner.startswith("ipv6:") else ""
    if prefix or ":" in inner:
        try:
            if "%" in inner:  # a zone index: Postfix's address check takes hex digits, colons and dots only
                raise ValueError(inner)
            return prefix + ipaddress.IPv6Address(inner.removeprefix(prefix)).compressed
        except ValueError as exc:
            raise PolicyInputError(field, f"{inner!r} is not an IPv6 address") from exc
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return _domain(inner, field)


def normalise_destination(raw: str, *, allow_subdomains: bool = False, field: str = "destination") -> str:
    """The lookup key Postfix will use: `example.org`, `.example.org`, `[host]`, `[host]:port`."""
    destination = _lookup_key(raw, allow_subdomains, field)
    # mailcow runs the whole dest, brackets and port included, through IDNA (mailcow-api.md §3): each
    # dot-separated piece must fit a label and the whole a name, else the worker could never add the row.
    if len(destination) > 253 or any(len(piece) > 63 for piece in destination.split(".")):
        raise PolicyInputError(
            field,
            "is too long for mailcow: counting brackets and port, each label must stay within 63 characters "
            "and the whole within 253",
        )
    return destination


def _lookup_key(raw: str, allow_subdomains: bool, field: str) -> str:
    value = raw.strip().lower()
    if not value:
        raise PolicyInputError(field, "must not be empty")
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\[\]]+)\](?::(\d{1,5}))?", value)
        if not match:
            raise PolicyInputError(field, "must be of the form [host] or [host]:port")
        host = _bracketed_host(match.group(1), field)
        port = match.group(2)
        if port is not None and not 0 < int(port) < 65536:
            raise PolicyInputError(field, "port must be between 1 and 65535")
        return f"[{host}]" + (f":{int(port)}" if port else "")
    try:
        return f"[{ipaddress.IPv4Address(value)}]"
    except ValueError:
        pass
    if value.endswith(".") and not value.endswith(".."):
        value = value[:-1]
    if value.startswith("."):
        if not allow_subdomains:
            raise PolicyInputError(
                field,
                "'.domain' (all subdomains) cannot be stored through this target's mailcow API; "
                "request each subdomain, or enable TLSO_MAILCOW_SUPPORTS_SUBDOMAIN_DEST",
            )
        return "." + _domain(value[1:], field)
    if value.count(":") > 1:
        raise PolicyInputError(field, _unbracketed_ipv6(value))
    if ":" in value:
        host, _, port = value.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise PolicyInputError(field, "port must be between 1 and 65535")
        return f"{_domain(host, field)}:{int(port)}"
    return _domain(value, field)


def _unbracketed_ipv6(value: str) -> str:
    """Why `2001:db8::1` (or `2001:db8::1:25`) is refused, and how Postfix writes it."""
    host, _, port = value.rpartition(":")
    written = "[2001:db8::1]:25"
    for address, suffix in ((host, f":{port}"), (value, "")):
        try:
            if "%" not in address:
                written = f"[{ipaddress.IPv6Address(address).compressed}]{suffix}"
                break
        except ValueError:
            continue
    return (
        "looks like an IPv6 address without brackets, which Postfix cannot tell from a port: write the next "
        f"hop as your transport or relayhost does, {written} (or with the RFC 5321 prefix, "
        f"{written.replace('[', '[ipv6:')}); Postfix looks the policy up by the next hop exactly as written"
    )


def mx_domain_of(destination: str) -> str | None:
    """The recipient domain a destination stands for, if it is a plain domain (for diagnosis)."""
    if destination.startswith(("[", ".")) or ":" in destination:
        return None
    return destination


@dataclass(frozen=True)
class _Attribute:
    repeatable: bool
    levels: frozenset[str] | None  # None: every level but `none`


_ALL = None
_ATTRIBUTES: dict[str, _Attribute] = {
    "ciphers": _Attribute(False, _ALL),
    "protocols": _Attribute(False, _ALL),
    "exclude": _Attribute(False, _ALL),
    "servername": _Attribute(False, _ALL),
    "match": _Attribute(True, frozenset({"fingerprint", "verify", "secure"})),
    "connection_reuse": _Attribute(False, _ALL),
    "enable_rpk": _Attribute(False, _ALL),
}
_REFUSED = {
    "tafile": "needs a file inside mailcow's postfix container; it cannot be provided through the API",
    **{
        name: "is a TLSRPT/MTA-STS plugin attribute; it is meaningless in a static policy row"
        for name in (
            "policy_type",
            "policy_domain",
            "policy_ttl",
            "policy_string",
            "mx_host_pattern",
            "policy_failure",
        )
    },
}


def _check_value(name: str, value: str, policy: str, field: str) -> str:
    if name == "ciphers":
        if value.lower() in _REFUSED_GRADES:
            raise PolicyInputError(field, f"ciphers={value.lower()} gives up encryption; use medium or high")
        if value.lower() not in _CIPHER_GRADES:
            raise PolicyInputError(field, f"ciphers must be one of {sorted(_CIPHER_GRADES)}")
        return value.lower()
    if name == "protocols":
        parts = value.split(":")
        if not all(_PROTOCOL.match(part) for part in parts):
            raise PolicyInputError(field, "protocols must look like '>=TLSv1.2' or '!SSLv2:!SSLv3'")
        return value
    if name == "exclude":
        if not all(_CIPHER_NAME.match(part) for part in value.split(":")):
            raise PolicyInputError(field, "exclude must be a ':'-separated list of cipher names")
        return value
    if name == "servername":
        return value if value == "hostname" else _domain(value, field)
    if name in {"connection_reuse", "enable_rpk"}:
        if value.lower() not in {"yes", "no"}:
            raise PolicyInputError(field, f"{name} must be 'yes' or 'no'")
        return value.lower()
    # match
    if policy == "fingerprint":
        digests = []
        for digest in value.split("|"):
            if not _HEX_DIGEST.match(digest) or len(digest.replace(":", "")) // 2 not in _DIGEST_BYTES:
                raise PolicyInputError(field, f"match={digest!r} is not a hex certificate or key digest")
            hexdigits = digest.replace(":", "").upper()
            if len(hexdigits) % 2:
                raise PolicyInputError(field, f"match={digest!r} has an odd number of hex digits")
            digests.append(":".join(hexdigits[i : i + 2] for i in range(0, len(hexdigits), 2)))
        return "|".join(digests)
    names = []
    for item in value.split(":"):
        if item in _MATCH_STRATEGIES:
            names.append(item)
        elif item.startswith("."):
            names.append("." + _domain(item[1:], field))
        else:
            names.append(_domain(item, field))
    return ":".join(names)


def normalise_parameters(raw: str, policy: str, field: str = "parameters") -> str:
    """Canonical `name=value` attributes, single-space separated, valid for `policy`; or an error."""
    if policy not in POLICIES:
        raise PolicyInputError("policy", f"must be one of {', '.join(POLICIES)}")
    if any(ch in raw for ch in "{}"):
        raise PolicyInputError(field, "the '{ name = value }' form cannot be stored through mailcow")
    if any(not ch.isprintable() and not ch.isspace() for ch in raw) or "\n" in raw or "\r" in raw:
        raise PolicyInputError(field, "must be a single line of printable characters")
    tokens = [token for token in re.split(r"[\s,]+", raw.strip()) if token]
    if tokens and policy == "none":
        raise PolicyInputError(field, "Postfix ignores every attribute at level 'none'; leave parameters empty")
    seen: set[str] = set()
    result = []
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or not name or not value:
            raise PolicyInputError(field, f"{token!r} is not of the form name=value")
        if name in _REFUSED:
            raise PolicyInputError(field, f"{name} {_REFUSED[name]}")
        attribute = _ATTRIBUTES.get(name)
        if attribute is None:
            raise PolicyInputError(
                field, f"unknown attribute {name!r}: Postfix would defer all mail to this destination"
            )
        if attribute.levels is not None and policy not in attribute.levels:
            raise PolicyInputError(
                field, f"{name}= is only valid at {'/'.join(sorted(attribute.levels))}, not at {policy!r}"
            )
        if name in seen and not attribute.repeatable:
            raise PolicyInputError(field, f"{name}= may be given only once")
        seen.add(name)
        result.append(f"{name}={_check_value(name, value, policy, field)}")
    if policy == "fingerprint" and "match" not in seen:
        raise PolicyInputError(field, "the fingerprint level needs at least one match=<digest>")
    canonical = " ".join(result)
    if len(canonical) > 255:
        raise PolicyInputError(field, f"is {len(canonical)} characters long; mailcow stores at most 255")
    return canonical
