"""mailcow's mail queue as tlsoverride keeps it (mailcow-api.md §12): pure parsing, no I/O.

`GET /api/v1/get/mailq/all` answers Postfix's `postqueue -j` objects in a JSON array (at most the
first 10,000), with one quirk: mailcow rewrites each recipient from `{"address", "delay_reason"}` into
one string, `"rcpt@example.org (delay reason)"`, or the bare address when there is no reason.

Privacy: of a recipient only the DOMAIN is kept (and a keyed hash, to count distinct recipients, whose key
lives in this process's memory only), and of the sender nothing — so only counts, delay reasons and times
can ever leave this module (API answers, logs, webhooks). Addresses inside delay reasons are redacted.
Entries that do not look like mailcow's are skipped, never raised: one odd message must not hide the
rest of the queue.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import idna

log = logging.getLogger("app.mailcow")

MAILQ_CAP: Final = 10_000  # mailcow answers at most the first 10,000 queued messages
QUEUE_NAMES: Final = frozenset({"maildrop", "incoming", "active", "deferred", "hold"})
# mailcow does not enable long queue ids: Postfix names a message with upper-case hex digits
_QUEUE_ID: Final = re.compile(r"[0-9A-F]+")
_DOMAIN_MAX: Final = 253
_KEY: Final = secrets.token_bytes(16)  # per process: a recipient's `key` is comparable within it only
# A remote server's reply in a delay reason often echoes the recipient ("said: 450 4.2.0
# <bob@example.org>: Recipient address rejected"): every address-like token is replaced by its domain.
_ADDRESS: Final = re.compile(r"<?[^\s<>()\[\]\"',;:@]+@([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])>?")


@dataclass(frozen=True)
class QueueRecipient:
    """One recipient of a queued message: its domain (A-label, lower-case) and Postfix's delay reason."""

    domain: str
    delay_reason: str | None
    # Tells two recipients apart (a keyed hash of the address, never shown); "" when unknown.
    key: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class QueueMessage:
    """One queued message, without sender, local parts or content."""

    queue_id: str
    queue_name: str
    arrival_time: datetime
    recipients: tuple[QueueRecipient, ...]

    @property
    def deferred(self) -> bool:
        return self.queue_name == "deferred"


class MailqShapeError(ValueError):
    """The answer as a whole is not mailcow's queue (not an array); the client raises it as a protocol error."""


def parse_mailq(payload: Any) -> list[QueueMessage]:
    """The queue in mailcow's `get/mailq/all` answer (decoded JSON); malformed entries are skipped."""
    if payload == {}:  # mailcow answers [] for an empty queue; {} (its "none" elsewhere) means the same
        return []
    if not isinstance(payload, list):
        raise MailqShapeError(f"mailq: expected a JSON array, got {type(payload).__name__}")
    messages: list[QueueMessage] = []
    skipped = 0
    for entry in payload[:MAILQ_CAP]:
        message = _message(entry)
        if message is None:
            skipped += 1
        else:
            messages.append(message)
    if skipped:
        # the count only: an entry may hold addresses
        log.warning("mailq: skipped %d queue entries that do not look like Postfix's", skipped)
    return messages


def capped(messages: list[QueueMessage] | int) -> bool:
    """Whether mailcow may have left messages out (it lists at most `MAILQ_CAP`)."""
    count = messages if isinstance(messages, int) else len(messages)
    return count >= MAILQ_CAP


def split_recipient(text: str) -> tuple[str, str | None]:
    """mailcow's `"rcpt@example.org (delay reason)"` as (address, reason): split on the first `" ("`,
    drop the final `)`; a bare address has no reason."""
    address, sep, rest = text.partition(" (")
    if not sep:
        return text.strip(), None
    reason = rest[:-1] if rest.endswith(")") else rest
    return address.strip(), redact_addresses(reason.strip()) or None


def redact_addresses(text: str) -> str:
    """`text` with each e-mail address replaced by `<…@domain>`: the local part never leaves this module."""
    return _ADDRESS.sub(lambda m: f"<…@{m.group(1).lower()}>", text)


def recipient_domain(address: str) -> str | None:
    """The domain of `address` as Postfix looks it up (A-label, lower-case, no final dot), or None."""
    _, at, domain = address.rpartition("@")
    if not at:
        return None
    domain = domain.strip().rstrip(".").lower()
    if domain.startswith("[") and domain.endswith("]"):  # an address literal: user@[192.0.2.1]
        return domain if len(domain) > 2 else None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    if not domain or len(domain) > _DOMAIN_MAX or any(ch.isspace() or ch in "@()<>" for ch in domain):
        return None
    return domain


def _recipient(item: Any) -> QueueRecipient | None:
    if isinstance(item, str):
        address, reason = split_recipient(item)
    elif isinstance(item, dict) and isinstance(item.get("address"), str):
        # Postfix's own shape, in case a mailcow version stops rewriting it
        address = item["address"]
        raw_reason = item.get("delay_reason")
        reason = redact_addresses(raw_reason.strip()) or None if isinstance(raw_reason, str) else None
    else:
        return None
    domain = recipient_domain(address)
    return None if domain is None else QueueRecipient(domain, reason, recipient_key(address))


def recipient_key(address: str) -> str:
    """An opaque key for `address` (case-insensitive), to count distinct recipients without keeping any."""
    return hashlib.blake2b(address.strip().lower().encode("utf-8", "replace"), key=_KEY, digest_size=8).hexdigest()


def _arrival(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _message(entry: Any) -> QueueMessage | None:
    if not isinstance(entry, dict):
        return None
    queue_id = entry.get("queue_id")
    queue_name = entry.get("queue_name")
    arrival = _arrival(entry.get("arrival_time"))
    recipients = entry.get("recipients")
    if not isinstance(queue_id, str) or _QUEUE_ID.fullmatch(queue_id) is None:
        return None
    if not isinstance(queue_name, str) or arrival is None or not isinstance(recipients, list):
        return None
    parsed = tuple(r for item in recipients if (r := _recipient(item)) is not None)
    return QueueMessage(queue_id=queue_id, queue_name=queue_name, arrival_time=arrival, recipients=parsed)
