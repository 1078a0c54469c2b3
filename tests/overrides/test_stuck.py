"""app.overrides.stuck: what the queue holds deferred for a destination (pure, no mailcow needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.mailcow.queue import MAILQ_CAP, QueueMessage, QueueRecipient, parse_mailq
from app.overrides.stuck import (
    NOT_ATTRIBUTABLE,
    QueueEvidence,
    ReasonCount,
    age_text,
    classify_reason,
    deferred_for,
    from_json,
    queue_error,
    queue_evidence,
    queue_line,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
NOT_VERIFIED = "Server certificate not verified"


def message(
    queue_id: str, *recipients: tuple[str, str | None], hours: float = 1, queue_name: str = "deferred"
) -> QueueMessage:
    return QueueMessage(
        queue_id,
        queue_name,
        NOW - timedelta(hours=hours),
        tuple(QueueRecipient(domain, reason) for domain, reason in recipients),
    )


def test_counts_messages_recipients_oldest_and_reasons_for_the_destination() -> None:
    queue = [
        message("A1", ("example.org", NOT_VERIFIED), ("example.org", NOT_VERIFIED), hours=3),
        message("A2", ("example.org", "TLSA lookup error for mx2.example.org:25"), ("other.example", NOT_VERIFIED)),
        message("A3", ("other.example", NOT_VERIFIED), hours=30),
        message("A4", ("example.org", NOT_VERIFIED), queue_name="active"),  # being delivered: not deferred
        message("A5", ("example.org", NOT_VERIFIED), queue_name="hold"),
    ]
    evidence = queue_evidence(queue, "example.org", NOW)
    assert (evidence.messages, evidence.recipients, evidence.attributable) == (2, 3, True)
    assert evidence.oldest_arrival == NOW - timedelta(hours=3)
    assert evidence.reasons == (
        ReasonCount(NOT_VERIFIED, 2, "A", "TLSA mismatch", True),
        ReasonCount("TLSA lookup error for mx2.example.org:25", 1, "E", "TLSA lookup fails", True),
    )
    assert evidence.tls_recipients == 3
    assert [m.queue_id for m in deferred_for(queue, "example.org")] == ["A1", "A2"]
    assert queue_line(evidence) == (
        "2 messages to 3 recipients stuck for 3 h: Server certificate not verified; "
        "TLSA lookup error for mx2.example.org:25"
    )


@pytest.mark.parametrize(
    ("recipient_domain", "destination", "counted"),
    [
        ("Example.ORG", "example.org", True),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", True),
        ("xn--bcher-kva.example", "bücher.example", True),  # the destination as typed, A-label in the queue
        ("mail.example.org", "example.org", False),  # a subdomain is another destination
        ("mail.example.org", ".example.org", True),  # ... unless the override covers subdomains
        ("example.org", ".example.org", False),
        ("notexample.org", "example.org", False),
    ],
)
def test_which_recipients_a_destination_covers(recipient_domain: str, destination: str, counted: bool) -> None:
    [found] = parse_mailq(
        [
            {
                "queue_name": "deferred",
                "queue_id": "ABC",
                "arrival_time": 1_796_000_000,
                "recipients": [f"someone@{recipient_domain} ({NOT_VERIFIED})"],
            }
        ]
    )
    assert queue_evidence([found], destination, NOW).recipients == (1 if counted else 0)


@pytest.mark.parametrize("destination", ["[mx.example.org]:25", "[mx.example.org]", "[192.0.2.1]", "example.org:25"])
def test_a_next_hop_is_not_attributable(destination: str) -> None:
    queue = [message("A1", ("example.org", NOT_VERIFIED)), message("A2", ("mx.example.org", NOT_VERIFIED))]
    evidence = queue_evidence(queue, destination, NOW)
    assert (evidence.attributable, evidence.messages, evidence.note) == (False, 0, NOT_ATTRIBUTABLE)
    assert deferred_for(queue, destination) == []
    assert queue_line(evidence) is None


@pytest.mark.parametrize(
    ("reason", "failure_class", "tls"),
    [
        ("TLSA lookup error for mx.example.org:25", "E", True),
        ("Server certificate not verified", "A", True),
        ("TLS is required, but was not offered by host mx.example.org[192.0.2.1]", "B", True),
        ("Server certificate not trusted", None, True),
        ("Cannot start TLS: handshake failure", None, True),
        (
            "Host or domain name not found. Name service error for name=example.org type=MX: Host not found, try again",
            "F",
            True,
        ),
        (
            "Host or domain name not found. Name service error for name=mx.example.org type=AAAA: Host not found, "
            "try again",
            "G",
            True,
        ),
        ("connect to mx.example.org[192.0.2.1]:25: Connection timed out", None, False),
        ("host mx.example.org[192.0.2.1] said: 451 4.7.1 Greylisted (in reply to RCPT TO command)", None, False),
        (None, None, False),
    ],
)
def test_delay_reasons_map_to_failure_classes(reason: str | None, failure_class: str | None, tls: bool) -> None:
    rule = classify_reason(reason)
    assert (rule.failure_class if rule else None, rule.tls if rule else False) == (failure_class, tls)


def test_one_recipient_in_several_messages_counts_once() -> None:
    entries = [
        {
            "queue_name": "deferred",
            "queue_id": f"A{n}",
            "arrival_time": 1_796_000_000 + n,
            "recipients": [f"{who}@example.org ({NOT_VERIFIED})" for who in people],
        }
        for n, people in enumerate([("bob", "carol"), ("Bob",), ("dave", "carol")])
    ]
    evidence = queue_evidence(parse_mailq(entries), "example.org", NOW)
    assert (evidence.messages, evidence.recipients) == (3, 3)
    assert [(r.reason, r.recipients) for r in evidence.reasons] == [(NOT_VERIFIED, 3)]
    assert "bob" not in str(evidence.as_json()).lower() and "carol" not in str(evidence)


def test_a_message_without_reason_and_a_reason_for_no_tls() -> None:
    evidence = queue_evidence(
        [message("A1", ("example.org", None)), message("A2", ("example.org", "Connection refused"))], "example.org", NOW
    )
    assert [(r.reason, r.failure_class, r.tls) for r in evidence.reasons] == [
        ("(no reason given)", None, False),
        ("Connection refused", None, False),
    ]
    assert evidence.tls_recipients == 0


def test_the_line_for_nothing_errors_singulars_and_the_cap() -> None:
    assert queue_line(queue_evidence([], "example.org", NOW)) == "no mail deferred for example.org"
    assert queue_line(queue_error("example.org", NOW, "mailcow's mail queue could not be read")) is None
    assert queue_line(None) is None
    one = queue_evidence([message("A1", ("example.org", NOT_VERIFIED), hours=0.5)], "example.org", NOW)
    assert queue_line(one) == "1 message to 1 recipient stuck for 30 min: Server certificate not verified"
    full = [message(f"{n:X}", ("example.org", f"reason {n % 4}")) for n in range(1, MAILQ_CAP + 1)]
    line = queue_line(queue_evidence(full, "example.org", NOW))
    assert line is not None and line.startswith(f"{MAILQ_CAP}+ messages to {MAILQ_CAP}+ recipients")
    assert line.endswith("(+2 more)")


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (timedelta(seconds=5), "1 min"),
        (timedelta(minutes=59), "59 min"),
        (timedelta(hours=47), "47 h"),
        (timedelta(days=3, hours=5), "3 d"),
    ],
)
def test_age_text(age: timedelta, text: str) -> None:
    assert age_text(age) == text


def test_stored_evidence_reads_back_the_same() -> None:
    evidence = queue_evidence([message("A1", ("example.org", NOT_VERIFIED), hours=3)], "example.org", NOW)
    stored = evidence.as_json()
    assert stored["line"] == "1 message to 1 recipient stuck for 3 h: Server certificate not verified"
    assert from_json(stored) == evidence
    assert queue_line(stored) == stored["line"]
    assert from_json({"destination": "x"}) is None
    assert isinstance(from_json(queue_error("x.example", NOW, "down").as_json()), QueueEvidence)


def test_addresses_in_delay_reasons_never_reach_the_evidence() -> None:
    [parsed] = parse_mailq(
        [
            {
                "queue_name": "deferred",
                "queue_id": "ABC",
                "arrival_time": 1_796_000_000,
                "sender": "alice.sender@origin.example",
                "recipients": [
                    "bob.secret@example.org (host mx.example.org[192.0.2.1] said: 450 4.2.0 <bob.secret@example.org>: "
                    "Recipient address rejected: Greylisted (in reply to RCPT TO command))"
                ],
            }
        ]
    )
    stored = str(queue_evidence([parsed], "example.org", NOW).as_json())
    assert "bob.secret" not in stored and "alice" not in stored
    assert "<…@example.org>: Recipient address rejected" in stored
