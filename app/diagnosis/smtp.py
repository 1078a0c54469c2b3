"""STARTTLS probe of one MX address: banner, EHLO, STARTTLS, handshake (with or without SNI), the chain sent.

The handshake negotiates as mailcow's Postfix does (`TlsProfile`): its protocol floor
(`smtp_tls_mandatory_protocols = >=TLSv1.2`), its mandatory cipher grade (`medium`, Postfix's
`tls_medium_cipherlist`) and the OpenSSL security level Postfix ends up with at that TLS level. The
`legacy` profile asks what the host can do at all below that floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from app.diagnosis.certs import describe_certificate, load_chain
from app.diagnosis.models import SmtpProbe, Stage

_MAX_REPLY_LINES = 100
_ENCODING_DER = 2  # _ssl.ENCODING_DER

TlsProfile = Literal["authenticated", "unauthenticated", "legacy"]
"""How the handshake negotiates. All three offer Postfix's `medium` cipher grade.

- `authenticated`: as Postfix at the dane, fingerprint, verify and secure levels under mailcow:
  TLS 1.2 or later, OpenSSL security level 1 (the library default Postfix keeps there: in the lab
  posttls-finger at `fingerprint` accepts 1024-bit DHE, which level 2 refuses, and refuses the SHA-1
  signatures of TLS 1.0/1.1, "legacy sigalg disallowed or unsupported").
- `unauthenticated`: as Postfix at the encrypt and may levels under mailcow: TLS 1.2 or later at
  security level 0 (in the lab posttls-finger at `encrypt` completes TLS 1.1 with SHA-1 signatures).
- `legacy`: what Postfix negotiates under `encrypt protocols=>=TLSv1`: TLS 1.0 and later, security
  level 0. Used only to learn what a host that fails the others can do at all."""

# Postfix 3.7's tls_medium_cipherlist (smtp_tls_mandatory_ciphers = medium, mailcow keeps the default).
_MEDIUM_CIPHERS = "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"
_PROFILES: dict[TlsProfile, tuple[ssl.TLSVersion, int, str]] = {
    "authenticated": (ssl.TLSVersion.TLSv1_2, 1, ">=TLSv1.2"),
    "unauthenticated": (ssl.TLSVersion.TLSv1_2, 0, ">=TLSv1.2"),
    "legacy": (ssl.TLSVersion.TLSv1, 0, ">=TLSv1"),
}


@dataclass
class ProbeOutcome:
    probe: SmtpProbe
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.probe.failed_stage != "connect"

    @property
    def tls_ok(self) -> bool:
        return bool(self.chain)


class _SmtpError(Exception):
    def __init__(self, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass
class _Session:
    port: int
    sni: str | None
    profile: TlsProfile
    stage: Stage = "connect"
    banner: str | None = None
    ehlo: list[str] = field(default_factory=list)
    starttls_offered: bool | None = None
    tls_version: str | None = None
    cipher: str | None = None
    chain_der: list[bytes] = field(default_factory=list)


async def probe_smtp(
    address: str,
    port: int,
    sni: str | None,
    helo_name: str,
    timeout: float,
    deadline: float,
    profile: TlsProfile = "authenticated",
) -> ProbeOutcome:
    """Never raises: a failure is recorded with the stage it happened at.

    `timeout` bounds each step; `deadline` (DiagnosisConfig.probe_deadline) the whole conversation, so a server
    that drips one reply line just inside `timeout` cannot hold the probe for long. `sni` None sends
    no SNI, as Postfix below the dane level without `servername=`."""
    started = time.monotonic()
    session = _Session(port=port, sni=sni, profile=profile)
    failed_stage: Stage | None = None
    error: str | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(deadline):
            try:
                reader, opened = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
            except (OSError, TimeoutError) as exc:
                raise _SmtpError("connect", _os_error_text(exc)) from exc
            writer = opened
            await _converse(reader, opened, session, helo_name, timeout)
    except _SmtpError as exc:
        failed_stage, error = exc.stage, str(exc)
    except TimeoutError:
        # Only the overall deadline gets here (every step handles its own timeout). Once the chain is
        # recorded, what remains is the courtesy EHLO/QUIT: nothing is missing.
        if not session.chain_der:
            failed_stage, error = session.stage, f"the probe did not finish within its deadline of {deadline:g} s"
    finally:
        if writer is not None:
            await _close(writer)
    chain: list[x509.Certificate] = []
    chain_error: str | None = None
    if session.chain_der:
        try:
            chain = load_chain(session.chain_der)
        except ValueError as exc:
            chain_error = f"unparsable certificate in the chain: {exc}"
    probe = SmtpProbe(
        port=port,
        sni=sni,
        protocols=_PROFILES[profile][2],
        security_level=_PROFILES[profile][1],
        banner=session.banner,
        ehlo=session.ehlo,
        starttls_offered=session.starttls_offered,
        tls_version=session.tls_version,
        cipher=session.cipher,
        chain=[describe_certificate(cert, depth) for depth, cert in enumerate(chain)],
        failed_stage="handshake" if chain_error else failed_stage,
        error=chain_error or error,
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    return ProbeOutcome(probe, chain)


async def _converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _Session, helo_name: str, timeout: float
) -> None:
    session.stage = "banner"
    code, lines = await _read_reply(reader, timeout, "banner")
    session.banner = " / ".join(lines)
    if code != 220:
        raise _SmtpError("banner", f"greeting {code} {session.banner}")
    session.stage = "ehlo"
    code, lines = await _command(reader, writer, f"EHLO {helo_name}", timeout, "ehlo")
    if code != 250:
        raise _SmtpError("ehlo", f"EHLO answered {code} {' '.join(lines)}")
    session.ehlo = lines
    session.starttls_offered = any(line.split()[:1] == ["STARTTLS"] for line in (x.upper() for x in lines[1:]))
    if not session.starttls_offered:
        with contextlib.suppress(_SmtpError):
            await _command(reader, writer, "QUIT", timeout, "ehlo")
        return
    session.stage = "starttls"
    code, lines = await _command(reader, writer, "STARTTLS", timeout, "starttls")
    if code != 220:
        raise _SmtpError("starttls", f"STARTTLS answered {code} {' '.join(lines)}")
    session.stage = "handshake"
    try:
        await asyncio.wait_for(
            writer.start_tls(
                _client_context(session.profile), server_hostname=session.sni, ssl_handshake_timeout=timeout
            ),
            timeout + 1,
        )
    except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
        raise _SmtpError("handshake", f"TLS handshake failed: {_os_error_text(exc)}") from exc
    except ValueError as exc:
        # The SNI name cannot be encoded (a label longer than 63 characters once binary octets are
        # escaped, …): no handshake happens.
        raise _SmtpError("handshake", f"TLS handshake not attempted: unusable SNI name ({exc})") from exc
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        raise _SmtpError("handshake", "no TLS session after the handshake")
    session.tls_version = ssl_object.version()
    cipher = ssl_object.cipher()
    session.cipher = cipher[0] if cipher else None
    session.chain_der = _peer_chain(ssl_object)
    # The rest is courtesy towards the server; what we need is recorded.
    with contextlib.suppress(_SmtpError):
        await _command(reader, writer, f"EHLO {helo_name}", timeout, "handshake")
        await _command(reader, writer, "QUIT", timeout, "handshake")


def _client_context(profile: TlsProfile) -> ssl.SSLContext:
    # DANE replaces PKIX; we match the chain ourselves. A fresh context per probe: no session reuse.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    minimum, level, _ = _PROFILES[profile]
    context.set_ciphers(f"{_MEDIUM_CIPHERS}:@SECLEVEL={level}")
    with warnings.catch_warnings():
        # Python deprecates offering TLS 1.0/1.1; the legacy probe exists to find hosts that need it.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
    return context


def _peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The whole chain the server sent (Python 3.13+: public API; 3.10-3.12: the private one)."""
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        return [bytes(der) for der in public() or []]
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        return [cert.public_bytes(_ENCODING_DER) for cert in getter() or []]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, timeout: float, stage: Stage
) -> tuple[int, list[str]]:
    try:
        writer.write(line.encode("ascii") + b"\r\n")
        await asyncio.wait_for(writer.drain(), timeout)
    except (OSError, TimeoutError) as exc:
        raise _SmtpError(stage, f"sending {line.split()[0]}: {_os_error_text(exc)}") from exc
    return await _read_reply(reader, timeout, stage)


async def _read_reply(reader: asyncio.StreamReader, timeout: float, stage: Stage) -> tuple[int, list[str]]:
    lines: list[str] = []
    while len(lines) < _MAX_REPLY_LINES:
        try:
            raw = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError as exc:
            raise _SmtpError(stage, f"no reply within {timeout:g} s") from exc
        except (OSError, ValueError) as exc:
            raise _SmtpError(stage, _os_error_text(exc)) from exc
        if not raw:
            raise _SmtpError(stage, "connection closed by the server")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise _SmtpError(stage, f"malformed reply {line[:80]!r}")
        lines.append(line[4:])
        if len(line) == 3 or line[3] == " ":
            return int(line[:3]), lines
    raise _SmtpError(stage, "reply too long")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
