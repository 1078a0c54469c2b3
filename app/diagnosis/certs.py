"""Certificates the server sent: digests, DANE matching (RFC 7672 §3) and the WebPKI check for `verify`."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import ssl
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from app.diagnosis.models import AddressStatus, CertificateInfo, TlsaRecord

_MAX_PATH = 10


def spki_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def colon_hex(digest: bytes) -> str:
    """Postfix's fingerprint notation: `7F:92:30:…`."""
    return ":".join(f"{b:02X}" for b in digest)


def tlsa_data(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The data a TLSA record with this selector and matching type would carry for `cert`."""
    content = cert_der(cert) if selector == 0 else spki_der(cert)
    if mtype == 0:
        return content
    if mtype == 1:
        return hashlib.sha256(content).digest()
    return hashlib.sha512(content).digest()


# A digest of the wrong length can match nothing: Postfix logs "unusable TLSA RR" and ignores it.
_DIGEST_LENGTHS = {1: 32, 2: 64}


def make_tlsa_record(usage: int, selector: int, mtype: int, data_hex: str) -> TlsaRecord:
    data = data_hex.lower()
    usable = (
        usage in (2, 3)
        and selector in (0, 1)
        and mtype in (0, 1, 2)
        and len(data) // 2 == _DIGEST_LENGTHS.get(mtype, len(data) // 2)
        and (mtype != 0 or bool(data))
    )
    return TlsaRecord(
        usage=usage, selector=selector, mtype=mtype, data=data, usable=usable, text=f"{usage} {selector} {mtype} {data}"
    )


def describe_certificate(cert: x509.Certificate, depth: int) -> CertificateInfo:
    der = cert_der(cert)
    spki_digest = hashlib.sha256(spki_der(cert)).digest()
    cert_digest = hashlib.sha256(der).digest()
    return CertificateInfo(
        depth=depth,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=certificate_names(cert),
        key_type=_key_type(cert),
        tlsa_3_1_1=spki_digest.hex(),
        tlsa_3_0_1=cert_digest.hex(),
        pkey_fingerprint=colon_hex(spki_digest),
        cert_fingerprint=colon_hex(cert_digest),
        der_b64=base64.b64encode(der).decode("ascii"),
    )


def load_chain(ders: Sequence[bytes]) -> list[x509.Certificate]:
    # Servers send all sorts of certificates (negative serials, …); judging them is our job, not a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return [x509.load_der_x509_certificate(der) for der in ders]


def certificate_names(cert: x509.Certificate) -> list[str]:
    """DNS names of the subjectAltName; the CN only when there is no DNS SAN (as OpenSSL does)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n).lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if names:
        return names
    return [str(attr.value).lower().rstrip(".") for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching; a wildcard only as the whole left-most label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:] and "*" not in pattern[2:]
    return False


@dataclass
class DaneMatch:
    status: AddressStatus
    matched: list[str] = field(default_factory=list)
    detail: str = ""
    leaf_expired: bool = False
    leaf_name_ok: bool = True

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def matched_ee(self) -> bool:
        return any(m.startswith("3 ") for m in self.matched)


def effective_records(records: Iterable[TlsaRecord]) -> list[TlsaRecord]:
    """Usable records after OpenSSL's digest agility (RFC 7671 §9): per usage and selector, SHA2-512
    records hide SHA2-256 ones (Postfix `tls_dane_digests = sha512 sha256`); full matches stay."""
    usable = [r for r in records if r.usable]
    strongest: dict[tuple[int, int], int] = {}
    for r in usable:
        if r.mtype != 0:
            key = (r.usage, r.selector)
            strongest[key] = max(strongest.get(key, 0), r.mtype)
    return [r for r in usable if r.mtype == 0 or r.mtype == strongest[(r.usage, r.selector)]]


def match_dane(
    chain: Sequence[x509.Certificate], records: Sequence[TlsaRecord], reference_names: Sequence[str], now: datetime
) -> DaneMatch:
    """Postfix's DANE check of the chain the server sent: DANE-EE (3) against the leaf only, no
    names or dates; DANE-TA (2) against an issuer, then chain signatures, dates and names."""
    usable = effective_records(records)
    leaf = chain[0]
    leaf_expired = not (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc)
    names = certificate_names(leaf)
    name_ok = any(name_matches(pattern, ref) for pattern in names for ref in reference_names)
    ee_hits = [r for r in usable if r.usage == 3 and tlsa_data(leaf, r.selector, r.mtype).hex() == r.data]
    if ee_hits:
        return DaneMatch(
            "pass",
            [f"{_short(r)} at depth 0" for r in ee_hits],
            "DANE-EE match on the leaf (names and dates are not checked for usage 3)",
            leaf_expired,
            name_ok,
        )
    ta_records = [r for r in usable if r.usage == 2]
    if not ta_records:
        return DaneMatch("tlsa-mismatch", detail="no DANE-EE record matches the served leaf")
    path = build_path(chain)
    for depth, cert in enumerate(path[1:], start=1):
        hits = [r for r in ta_records if tlsa_data(cert, r.selector, r.mtype).hex() == r.data]
        if hits:
            return _check_ta_path(path[: depth + 1], hits, depth, names, name_ok, reference_names, now)
    bare_key_hit = _bare_key_issuer(path[-1], ta_records)
    if bare_key_hit is not None:
        return _check_ta_path(path, [bare_key_hit], len(path), names, name_ok, reference_names, now)
    stray = [
        (depth, r)
        for depth, cert in enumerate(chain[1:], start=1)
        for r in ta_records
        if tlsa_data(cert, r.selector, r.mtype).hex() == r.data
    ]
    if stray:
        depth, record = stray[0]
        return DaneMatch(
            "chain-invalid",
            detail=f"{_short(record)} matches certificate {depth} of the chain sent, but the leaf does not chain to it",
        )
    top = path[-1]
    if top.issuer != top.subject:
        detail = (
            f"no DANE-TA record matches an issuer in the chain sent; the chain ends at "
            f"{top.subject.rfc4514_string()} and its issuer {top.issuer.rfc4514_string()} was not sent"
        )
    else:
        detail = "no DANE-TA record matches an issuer in the chain sent"
    return DaneMatch("tlsa-mismatch", detail=detail)


def _check_ta_path(
    path: Sequence[x509.Certificate],
    hits: Sequence[TlsaRecord],
    depth: int,
    leaf_names: Sequence[str],
    name_ok: bool,
    reference_names: Sequence[str],
    now: datetime,
) -> DaneMatch:
    matched = [f"{_short(r)} at depth {depth}" for r in hits]
    # `path` ends at the trust anchor when it is a certificate, whose own dates count too: OpenSSL
    # checks every certificate up to and including it (Postfix: "CA certificate verification failed
    # … certificate has expired"). A `2 1 0` bare key has no dates.
    for position, cert in enumerate(path):
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            what = "leaf" if position == 0 else f"certificate at depth {position}"
            return DaneMatch(
                "cert-expired",
                matched,
                f"DANE-TA matched, but the {what} is outside its validity ({cert.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d})",
                leaf_expired=position == 0,
            )
    if not name_ok:
        return DaneMatch(
            "name-mismatch",
            matched,
            f"DANE-TA matched, but the leaf names {', '.join(leaf_names) or 'nothing'}, "
            f"not {' or '.join(reference_names)}",
            leaf_name_ok=False,
        )
    return DaneMatch("pass", matched, "DANE-TA match, chain, dates and name verified")


def build_path(chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf first, then each issuer found among the certificates sent whose signature verifies."""
    path = [chain[0]]
    pool = list(chain[1:])
    while len(path) < _MAX_PATH:
        current = path[-1]
        if current.issuer == current.subject and issued_by(current, current):
            break
        issuer = next((c for c in pool if c not in path and issued_by(current, c)), None)
        if issuer is None:
            break
        path.append(issuer)
    return path


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _bare_key_issuer(top: x509.Certificate, ta_records: Sequence[TlsaRecord]) -> TlsaRecord | None:
    """A `2 1 0` record publishes the trust-anchor key itself, so the issuer need not be sent."""
    for record in ta_records:
        if record.selector != 1 or record.mtype != 0:
            continue
        try:
            key = serialization.load_der_public_key(bytes.fromhex(record.data))
        except (ValueError, UnsupportedAlgorithm):
            continue
        if _signature_verifies(key, top):
            return record
    return None


def _signature_verifies(key: object, cert: x509.Certificate) -> bool:
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _short(record: TlsaRecord) -> str:
    data = record.data if len(record.data) <= 16 else record.data[:16] + "…"
    return f"{record.usage} {record.selector} {record.mtype} {data}"


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


@dataclass(frozen=True)
class PkixResult:
    names: list[str]
    error: str | None


def pkix_check(chain: Sequence[x509.Certificate], candidates: Iterable[str], ca_file: str | None) -> PkixResult:
    """For which candidate names the chain validates against the CA bundle (Postfix `verify`/`secure`);
    when none does, each name's own reason (the MX host's is rarely the recipient domain's)."""
    store = _ca_store(ca_file or _default_ca_file())
    if store is None:
        return PkixResult([], "no CA bundle available")
    leaf, intermediates = chain[0], list(chain[1:])
    names: list[str] = []
    errors: dict[str, list[str]] = {}
    for name in dict.fromkeys(c.lower().rstrip(".") for c in candidates if c and "*" not in c):
        try:
            verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
            verifier.verify(leaf, intermediates)
        except (VerificationError, ValueError) as exc:
            errors.setdefault(_pkix_reason(exc, leaf), []).append(name)
            continue
        names.append(name)
    if names:
        return PkixResult(names, None)
    if not errors:
        return PkixResult([], "no candidate name")
    return PkixResult([], "; ".join(f"{', '.join(failed)}: {reason}" for reason, failed in errors.items()))


def _pkix_reason(exc: Exception, leaf: x509.Certificate) -> str:
    text = str(exc)
    # cryptography appends the certificate it was processing; the chain is in the diagnosis anyway.
    text = text.split(" (encountered processing", 1)[0].removeprefix("validation failed: ")
    if "subjectAltName" not in text and leaf.issuer == leaf.subject and issued_by(leaf, leaf):
        # What OpenSSL (and Postfix) call it; cryptography reports the first extension it misses.
        return f"self-signed certificate, not issued by a CA in the bundle ({text})"
    return text


def _default_ca_file() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return candidate
    return ""


_store_lock = threading.Lock()


def _ca_store(path: str) -> Store | None:
    with _store_lock:  # parsed once, even when many probes finish at the same time
        return _load_store(path)


@functools.lru_cache(maxsize=4)
def _load_store(path: str) -> Store | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certs = x509.load_pem_x509_certificates(handle.read())
    except (OSError, ValueError):
        return None
    return Store(certs) if certs else None


def utc_now() -> datetime:
    return datetime.now(UTC)
