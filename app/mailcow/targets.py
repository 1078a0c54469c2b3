"""The configured mailcow instances ("targets") and their clients; API keys never leave this module.

The default target (`TLSO_DEFAULT_TARGET`) is `TLSO_MAILCOW_URL` with `TLSO_MAILCOW_API_KEY` or
`TLSO_MAILCOW_API_KEY_FILE`; more come from `TLSO_MAILCOW_TARGETS`:
`{"name": {"url": "https://…", "api_key_file": "/run/secrets/…", "timeout": "10"}}` (`api_key` works too).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.config import Settings, read_secret
from app.mailcow.client import MailcowClient


class TargetNotConfigured(Exception):
    """An override names a target that has no URL or no API key in the settings."""


# scrypt (RFC 7914) with a random salt per fingerprint: costly to brute-force even for a weak key from
# mailcow.conf, and useless as a key itself.
_FINGERPRINT = "scrypt"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


@functools.lru_cache(maxsize=64)
def _digest(key: str, salt: bytes) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, **_SCRYPT)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    timeout: float
    _api_key: str = field(repr=False)

    def key_fingerprint(self) -> str:
        """A salted hash of this target's API key (`scrypt$<salt>$<hash>`): it tells one key from another
        (`holds_key`) and reveals nothing of the key; it is what a pause records, never the key."""
        salt = secrets.token_bytes(16)
        return f"{_FINGERPRINT}${_b64(salt)}${_b64(_digest(self._api_key, salt))}"

    def holds_key(self, fingerprint: str) -> bool:
        """Whether `fingerprint` was made from the API key configured for this target now."""
        kind, _, rest = fingerprint.partition("$")
        salt_text, _, digest_text = rest.partition("$")
        if kind != _FINGERPRINT or not salt_text or not digest_text:
            return False
        try:
            salt, digest = _unb64(salt_text), _unb64(digest_text)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(_digest(self._api_key, salt), digest)

    def client(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        attempts: int | None = None,
    ) -> MailcowClient:
        """A client for this target; close it (`async with`) when done."""
        return MailcowClient(
            self.url,
            self._api_key,
            name=self.name,
            timeout=self.timeout,
            attempts=attempts or settings.mailcow_attempts,
            backoff_initial=settings.mailcow_retry_backoff_seconds,
            backoff_max=settings.mailcow_retry_backoff_seconds * 10,
            transport=transport,
        )


def configured_targets(settings: Settings) -> dict[str, Target]:
    """Every target with a URL and a key (a missing key file is a configuration error: it raises)."""
    targets: dict[str, Target] = {}
    if settings.mailcow_url:
        key = read_secret(settings.mailcow_api_key, settings.mailcow_api_key_file)
        if key:
            targets[settings.default_target] = Target(
                settings.default_target, settings.mailcow_url, settings.mailcow_timeout_seconds, key
            )
    for name, spec in settings.mailcow_targets.items():
        url = spec.get("url", "")
        key_file = spec.get("api_key_file")
        key = read_secret(None, Path(key_file)) if key_file else spec.get("api_key")
        if url and key:
            timeout = float(spec.get("timeout") or settings.mailcow_timeout_seconds)
            targets[name] = Target(name, url, timeout, key)
    return targets
