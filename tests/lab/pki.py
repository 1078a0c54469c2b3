"""Lab certificates (cryptography): self-signed leaves, a lab CA, re-issued and expired certificates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def spki_sha256(self) -> str:
        spki = self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).hexdigest()

    @property
    def cert_sha256(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def pkey_fingerprint(self) -> str:
        digest = self.spki_sha256.upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    subject: str,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    issuer: Issued | None = None,
    san: list[str] | None = None,
    ca: bool = False,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
) -> Issued:
    """A certificate for `subject`; self-signed unless `issuer` is given."""
    key = key or new_key()
    now = datetime.now(UTC)
    not_before = not_before or now - timedelta(days=1)
    not_after = not_after or now + timedelta(days=90)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.cert.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in (san or [subject])]), critical=False
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def write_pem(directory: Path, name: str, leaf: Issued, chain: list[Issued] | None = None) -> tuple[Path, Path]:
    """`name.pem` (leaf, then the chain the server sends) and `name.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pem = b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in [leaf, *(chain or [])])
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
