"""Signed checkpoints of the chain head: the keys, the signature, and reading checkpoints back.

A checkpoint says "the trail's row `seq` had hash `hash` at `at`", signed with an Ed25519 key that
the database does not hold. Whoever has the public key can tell a trail that was cut short or rewritten
(and re-hashed) from the one that was signed. The signed bytes are a fixed context line followed by
the four fields as sorted, compact JSON; `key_id` names the public key (the first 16 hex digits of
SHA-256 over its 32 raw bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.config import CoreSettings

CONTEXT = b"tlsoverride audit checkpoint v1\n"
CHECKPOINT_ACTION = "audit.checkpoint"


class Checkpoint(BaseModel):
    """The signed head of the audit chain (also the payload of an `audit.checkpoint` event)."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1, le=2**63 - 1, description="The sequence number of the signed row.")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="That row's hash.")
    at: str = Field(min_length=1, max_length=64, description="When it was signed (ISO 8601, as signed).")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="Which public key verifies it.")
    signature: str = Field(max_length=200, description="Ed25519 signature, base64.")

    def signed_bytes(self) -> bytes:
        body = {"at": self.at, "hash": self.hash, "key_id": self.key_id, "seq": self.seq}
        return CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    key: Ed25519PublicKey

    @classmethod
    def of(cls, key: Ed25519PublicKey) -> PublicKey:
        return cls(hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16], key)

    def encoded(self) -> str:
        return base64.b64encode(self.key.public_bytes_raw()).decode()

    def describe(self) -> dict[str, str]:
        return {"key_id": self.key_id, "algorithm": "Ed25519", "public_key": self.encoded()}

    def verifies(self, checkpoint: Checkpoint) -> bool:
        try:
            signature = base64.b64decode(checkpoint.signature, validate=True)
            self.key.verify(signature, checkpoint.signed_bytes())
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


class Signer:
    """The private half; it is never printed, logged or returned."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = PublicKey.of(private.public_key())

    def __repr__(self) -> str:
        return f"Signer(key_id={self.public.key_id!r})"

    def sign(self, seq: int, head_hash: str, at: datetime) -> Checkpoint:
        unsigned = Checkpoint(seq=seq, hash=head_hash, at=at.isoformat(), key_id=self.public.key_id, signature="")
        signature = base64.b64encode(self._private.sign(unsigned.signed_bytes())).decode()
        return unsigned.model_copy(update={"signature": signature})


def generate_private_pem() -> bytes:
    """A new signing key as PKCS#8 PEM (what `openssl genpkey -algorithm ed25519` writes)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(text: str) -> Ed25519PrivateKey:
    """PKCS#8 PEM, or base64 of the 32 raw bytes. Errors never quote the key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("the audit signing key is not an Ed25519 key")
            return key
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError("the audit signing key must be 32 bytes (base64) or a PEM private key")
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (binascii.Error, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("the audit signing key is neither PEM nor base64") from exc


def load_public_keys(text: str) -> list[PublicKey]:
    """Public keys as given to a verifier: base64 of the 32 raw bytes, a PEM public key, or the JSON
    that `python -m app audit public-key` and `GET /v1/audit/public-keys` print."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            document: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg}") from exc
        entries = document.get("keys", [document]) if isinstance(document, dict) else document
        if not isinstance(entries, list) or not entries:
            raise ValueError("a JSON key document needs `public_key` or a list `keys`")
        found = []
        for entry in entries:
            value = entry.get("public_key") if isinstance(entry, dict) else None
            if not isinstance(value, str):
                raise ValueError("each key in the JSON document needs a string `public_key`")
            found += load_public_keys(value)
        return found
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            return [PublicKey.of(key)]
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes; this is not one")
        return [PublicKey.of(Ed25519PublicKey.from_public_bytes(raw))]
    except (binascii.Error, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a public key (base64 of 32 bytes, PEM or JSON)") from exc


def signer_from(settings: CoreSettings) -> Signer | None:
    text = settings.audit_signing_key_text
    return Signer(load_private_key(text)) if text else None


def trusted_keys(settings: CoreSettings) -> dict[str, PublicKey]:
    """The keys whose checkpoints this service accepts: its signing key's, and TLSO_AUDIT_PUBLIC_KEYS."""
    keys: dict[str, PublicKey] = {}
    signer = signer_from(settings)
    if signer is not None:
        keys[signer.public.key_id] = signer.public
    for text in settings.audit_public_keys:
        for key in load_public_keys(text):
            keys[key.key_id] = key
    return keys


def parse_checkpoints(text: str) -> list[Checkpoint]:
    """Checkpoints as published: the bare JSON, a webhook body, a log line (JSON or plain) or the audit
    event itself; one JSON document, or one per line. A line that holds none is an error naming it."""
    try:
        documents: list[tuple[int, Any]] = [(1, json.loads(text))]
    except json.JSONDecodeError:
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                documents.append((number, _json_line(number, line)))
    checkpoints = []
    for number, document in documents:
        items = document if isinstance(document, list) else [document]
        if isinstance(document, dict) and isinstance(document.get("checkpoints"), list):
            items = document["checkpoints"]
        for item in items:
            found = _find_checkpoint(item)
            if found is None:
                raise ValueError(f"line {number}: holds no audit checkpoint")
            try:
                checkpoints.append(Checkpoint.model_validate(found))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"line {number}: not a valid checkpoint ({where}: {first['msg']})") from None
    if not checkpoints:
        raise ValueError("no checkpoint given")
    return checkpoints


def _json_line(number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        # A plain-text log line ends with the checkpoint's JSON: `... audit.checkpoint {...}`.
        _, marker, rest = line.partition(f"{CHECKPOINT_ACTION} {{")
        if marker:
            try:
                return json.loads("{" + rest)
            except json.JSONDecodeError:
                pass
        raise ValueError(f"line {number}: not JSON ({exc.msg})") from None


def _find_checkpoint(document: Any, depth: int = 0) -> dict[str, Any] | None:
    if not isinstance(document, dict) or depth > 3:
        return None
    if "signature" in document and "key_id" in document:
        return document
    for key in ("checkpoint", "after", "data"):  # a log line, an audit event, a webhook body
        found = _find_checkpoint(document.get(key), depth + 1)
        if found is not None:
            return found
    return None
