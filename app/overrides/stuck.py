"""What mailcow's queue says about an override's destination: pure rules, no I/O (the queue is read by
`app.overrides.queue_watch`).

* Attribution: a deferred recipient counts for a destination when its domain is the destination
  (`example.org`; case-insensitive, A-labels as `app.mailcow.dest` compares them) or, for `.example.org`,
  a subdomain of it. A next hop (`[mx.example.org]:25`, `example.org:25`) is not attributable: the queue
  shows recipient domains, not the next hop a transport map chose for them.
* Delay reasons are mapped to the diagnosis's failure classes (dane.md §2.2) by what Postfix writes
  for each; a reason that matches none stays unclassified, and `tls` says whether it is a TLS failure
  an override can fix.
* Only counts, reasons (addresses already redacted by `app.mailcow.queue`) and times are kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from app.mailcow.dest import dest_key
from app.mailcow.queue import QueueMessage, capped, recipient_domain
from app.overrides.summary import FAILURE_CLASSES

MAX_REASONS: Final = 10  # distinct reasons kept per destination (by recipients, most first)


@dataclass(frozen=True)
class ReasonRule:
    pattern: re.Pattern[str]
    failure_class: str | None  # the diagnosis's class (dane.md §2.2), if the reason points at one
    label: str
    tls: bool = True  # a TLS/DANE failure: what an override is for


def _rule(pattern: str, failure_class: str | None, label: str, *, tls: bool = True) -> ReasonRule:
    return ReasonRule(re.compile(pattern, re.IGNORECASE), failure_class, label, tls)


# Postfix's wording (smtp(8) 3.7, dane.md §2.2 [lab]), first match wins.
REASON_RULES: Final = (
    _rule(r"TLSA lookup error", "E", FAILURE_CLASSES["E"]),
    _rule(r"Server certificate not verified", "A", FAILURE_CLASSES["A"]),
    _rule(r"TLS is required, but was not offered", "B", FAILURE_CLASSES["B"]),
    _rule(r"Server certificate not trusted", None, "certificate not trusted (PKIX)"),
    _rule(r"Cannot start TLS", None, "TLS handshake failed"),
    _rule(r"Name service error for name=\S+ type=MX: Host not found, try again", "F", FAILURE_CLASSES["F"]),
    _rule(r"Name service error for name=\S+ type=(A|AAAA): Host not found, try again", "G", FAILURE_CLASSES["G"]),
    # `smtp_tls_security_level` failures under a `dane-only`/`secure`/`verify` override
    _rule(r"\bTLS\b.*\b(failed|failure|required)\b", None, "TLS failure"),
)


def classify_reason(reason: str | None) -> ReasonRule | None:
    """The rule `reason` matches, or None (not a TLS failure, or no reason given)."""
    if not reason:
        return None
    return next((rule for rule in REASON_RULES if rule.pattern.search(reason)), None)


@dataclass(frozen=True)
class ReasonCount:
    reason: str
    recipients: int
    failure_class: str | None
    label: str | None
    tls: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "recipients": self.recipients,
            "failure_class": self.failure_class,
            "label": self.label,
            "tls": self.tls,
        }


@dataclass(frozen=True)
class QueueEvidence:
    """Mail deferred for one destination at `checked_at`."""

    destination: str
    checked_at: datetime
    attributable: bool = True
    messages: int = 0
    recipients: int = 0
    oldest_arrival: datetime | None = None
    reasons: tuple[ReasonCount, ...] = field(default_factory=tuple)
    capped: bool = False  # mailcow lists at most 10,000 messages: the counts may be higher
    error: str | None = None
    note: str | None = None

    @property
    def tls_recipients(self) -> int:
        """Recipients deferred with a TLS reason (what the override should release)."""
        return sum(r.recipients for r in self.reasons if r.tls)

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "checked_at": self.checked_at.isoformat(),
            "attributable": self.attributable,
            "messages": self.messages,
            "recipients": self.recipients,
            "oldest_arrival": self.oldest_arrival.isoformat() if self.oldest_arrival else None,
            "reasons": [r.as_json() for r in self.reasons],
            "capped": self.capped,
            "error": self.error,
            "note": self.note,
            "line": queue_line(self),
        }


NOT_ATTRIBUTABLE: Final = (
    "a next hop is not attributable: the queue shows recipient domains, not the next hop mail is routed to"
)


def attributable(destination: str) -> bool:
    return not (destination.startswith("[") or ":" in destination)


def matcher(destination: str) -> Callable[[str], bool] | None:
    """A test for recipient domains that `destination` covers (None if it covers none: a next hop)."""
    if not attributable(destination):
        return None
    wanted = recipient_domain(f"x@{destination.lstrip('.')}")
    if wanted is None:
        return None
    key = dest_key(wanted)
    if destination.startswith("."):
        return lambda domain: dest_key(domain).endswith("." + key)
    return lambda domain: dest_key(domain) == key


def deferred_for(messages: Iterable[QueueMessage], destination: str) -> list[QueueMessage]:
    """The deferred messages with at least one recipient `destination` covers (none for a next hop)."""
    covers = matcher(destination)
    if covers is None:
        return []
    return [m for m in messages if m.deferred and any(covers(r.domain) for r in m.recipients)]


def queue_evidence(messages: list[QueueMessage], destination: str, now: datetime) -> QueueEvidence:
    """What the queue holds deferred for `destination`: counts, oldest arrival, distinct reasons."""
    covers = matcher(destination)
    if covers is None:
        return QueueEvidence(destination, now, attributable=False, note=NOT_ATTRIBUTABLE)
    found = deferred_for(messages, destination)
    # distinct recipients (one address in several messages counts once), overall and per reason
    recipients: set[str] = set()
    by_reason: dict[str, set[str]] = {}
    for message in found:
        for n, recipient in enumerate(message.recipients):
            if covers(recipient.domain):
                ident = recipient.key or f"{message.queue_id}/{n}"
                recipients.add(ident)
                by_reason.setdefault(recipient.delay_reason or "", set()).add(ident)
    reasons = Counter({reason: len(idents) for reason, idents in by_reason.items()})
    counted = []
    for reason, count in reasons.most_common(MAX_REASONS):
        rule = classify_reason(reason)
        counted.append(
            ReasonCount(
                reason=reason or "(no reason given)",
                recipients=count,
                failure_class=rule.failure_class if rule else None,
                label=rule.label if rule else None,
                tls=rule.tls if rule else False,
            )
        )
    return QueueEvidence(
        destination,
        now,
        messages=len(found),
        recipients=len(recipients),
        oldest_arrival=min((m.arrival_time for m in found), default=None),
        reasons=tuple(counted),
        capped=capped(messages),
    )


def queue_error(destination: str, now: datetime, error: str) -> QueueEvidence:
    """The evidence when the queue could not be read: the error, no counts."""
    return QueueEvidence(destination, now, error=error)


def queue_line(evidence: QueueEvidence | Mapping[str, Any] | None) -> str | None:
    """ "14 messages to 9 recipients stuck for 3 h: Server certificate not verified", or None when there
    is nothing to say (not read, failed, a next hop)."""
    if evidence is None:
        return None
    if isinstance(evidence, Mapping):
        evidence = from_json(evidence)
        if evidence is None:
            return None
    if evidence.error or not evidence.attributable:
        return None
    if evidence.messages == 0:
        return f"no mail deferred for {evidence.destination}"
    plus = "+" if evidence.capped else ""
    text = (
        f"{evidence.messages}{plus} {_plural(evidence.messages, 'message')} to {evidence.recipients}{plus} "
        f"{_plural(evidence.recipients, 'recipient')}"
    )
    if evidence.oldest_arrival is not None:
        text += f" stuck for {age_text(evidence.checked_at - evidence.oldest_arrival)}"
    reasons = [r.reason for r in evidence.reasons[:2]]
    if reasons:
        more = len(evidence.reasons) - len(reasons)
        text += ": " + "; ".join(reasons) + (f" (+{more} more)" if more else "")
    return text


def from_json(data: Mapping[str, Any]) -> QueueEvidence | None:
    """The evidence as stored on an override (`as_json`), or None if it does not look like it."""
    try:
        return QueueEvidence(
            destination=str(data["destination"]),
            checked_at=datetime.fromisoformat(str(data["checked_at"])),
            attributable=bool(data.get("attributable", True)),
            messages=int(data.get("messages") or 0),
            recipients=int(data.get("recipients") or 0),
            oldest_arrival=datetime.fromisoformat(str(data["oldest_arrival"])) if data.get("oldest_arrival") else None,
            reasons=tuple(
                ReasonCount(
                    reason=str(r["reason"]),
                    recipients=int(r["recipients"]),
                    failure_class=r.get("failure_class"),
                    label=r.get("label"),
                    tls=bool(r.get("tls")),
                )
                for r in data.get("reasons") or ()
            ),
            capped=bool(data.get("capped")),
            error=data.get("error"),
            note=data.get("note"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def age_text(age: timedelta) -> str:
    """A queue age as a reviewer reads it: `40 min`, `3 h`, `2 d`."""
    seconds = max(0, int(age.total_seconds()))
    if seconds < 3600:
        return f"{max(1, seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"
