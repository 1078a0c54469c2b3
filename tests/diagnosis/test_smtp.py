"""app.diagnosis.smtp against STARTTLS servers started here: the probe negotiates as mailcow's Postfix.

What Postfix does with each server was seen with posttls-finger in the lab (tests/lab/README.md,
"Legacy TLS"): TLS 1.0/1.1 fail at every level under mailcow's `>=TLSv1.2`; with `protocols=>=TLSv1`
they work at `encrypt` (security level 0) and fail at `fingerprint`/`verify`/`dane` ("legacy sigalg
disallowed or unsupported", security level 1); 1024-bit DHE works at `fingerprint` (level 1, which
Python's default level 2 would refuse).
"""

from __future__ import annotations

import asyncio
import ssl
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from app.diagnosis.smtp import TlsProfile, probe_smtp
from tests.lab.pki import issue, write_pem

PROFILES: tuple[TlsProfile, ...] = ("authenticated", "unauthenticated", "legacy")
# RFC 2409 §6.2, the 1024-bit MODP group: a DHE group OpenSSL security level 2 refuses and level 1 accepts.
_OAKLEY_GROUP_2 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
    16,
)


def _rsa_pem(directory: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa.example.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "rsa.pem", directory / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _server_context(tmp_path: Path, kind: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "tls11":
            cert, key = write_pem(tmp_path, "ec", issue("legacy.example.test"))
            context.load_cert_chain(cert, key)
            context.set_ciphers("ALL:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        elif kind == "dhe1024":
            cert, key = _rsa_pem(tmp_path)
            context.load_cert_chain(cert, key)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                params = dh.DHParameterNumbers(_OAKLEY_GROUP_2, 2).parameters()
            dh_path = tmp_path / "dh.pem"
            dh_path.write_bytes(params.parameter_bytes(serialization.Encoding.PEM, serialization.ParameterFormat.PKCS3))
            context.set_ciphers("DHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0")
            context.load_dh_params(str(dh_path))
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        else:  # a NULL cipher only: no encryption, outside Postfix's `medium` grade
            cert, key = write_pem(tmp_path, "ec", issue("null.example.test"))
            context.load_cert_chain(cert, key)
            context.set_ciphers("eNULL:@SECLEVEL=0")
            context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.fixture
async def starttls_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[int]:
    context = _server_context(tmp_path, request.param)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stub ESMTP\r\n")
        try:
            while line := await reader.readline():
                command = line.strip().upper()
                if command.startswith(b"EHLO"):
                    writer.write(b"250-stub\r\n250 STARTTLS\r\n")
                elif command == b"STARTTLS":
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(context)
                elif command == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _versions(port: int) -> dict[str, str | None]:
    outcomes = [await probe_smtp("127.0.0.1", port, None, "h.invalid", 3.0, 6.0, profile) for profile in PROFILES]
    return {profile: o.probe.tls_version if o.tls_ok else None for profile, o in zip(PROFILES, outcomes, strict=True)}


@pytest.mark.parametrize("starttls_server", ["tls11"], indirect=True)
async def test_tls_1_1_only_needs_the_legacy_probe(starttls_server: int) -> None:
    assert await _versions(starttls_server) == {"authenticated": None, "unauthenticated": None, "legacy": "TLSv1.1"}
    legacy = await probe_smtp("127.0.0.1", starttls_server, None, "h.invalid", 3.0, 6.0, "legacy")
    assert (legacy.probe.protocols, legacy.probe.security_level) == (">=TLSv1", 0)


@pytest.mark.parametrize("starttls_server", ["dhe1024"], indirect=True)
async def test_security_level_is_postfixs_not_pythons(starttls_server: int) -> None:
    # Postfix at fingerprint (security level 1) accepts a 1024-bit DHE group; Python's default level 2
    # would call the handshake failed and the verdict would say "blocked" where Postfix delivers.
    assert await _versions(starttls_server) == {
        "authenticated": "TLSv1.2",
        "unauthenticated": "TLSv1.2",
        "legacy": "TLSv1.2",
    }


@pytest.mark.parametrize("starttls_server", ["null"], indirect=True)
async def test_ciphers_outside_the_medium_grade_fail(starttls_server: int) -> None:
    assert await _versions(starttls_server) == {"authenticated": None, "unauthenticated": None, "legacy": None}
