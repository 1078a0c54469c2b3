"""parse_mailq: mailcow's queue answer (mailcow-api.md §12) as tlsoverride keeps it — domains only."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from app.mailcow.queue import (
    MAILQ_CAP,
    MailqShapeError,
    QueueMessage,
    QueueRecipient,
    capped,
    parse_mailq,
    recipient_domain,
    split_recipient,
)

ARRIVAL = 1_796_000_000


def entry(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "queue_name": "deferred",
        "queue_id": "4B1C2D3E4F",
        "arrival_time": ARRIVAL,
        "message_size": 1834,
        "forced_expire": False,
        "sender": "alice.sender@origin.example",
        "recipients": ["bob.secret@example.org (Server certificate not verified)"],
    }
    base.update(fields)
    return base


def test_a_mailcow_entry_keeps_domain_reason_and_time_only() -> None:
    [message] = parse_mailq([entry()])
    assert message == QueueMessage(
        queue_id="4B1C2D3E4F",
        queue_name="deferred",
        arrival_time=datetime.fromtimestamp(ARRIVAL, UTC),
        recipients=(QueueRecipient("example.org", "Server certificate not verified"),),
    )
    assert message.deferred
    # privacy: neither the sender nor the recipient's local part is kept anywhere in the model
    assert "alice" not in repr(message) and "bob.secret" not in repr(message)


@pytest.mark.parametrize(
    ("text", "address", "reason"),
    [
        (
            "rcpt@example.org (TLSA lookup error for mx.example.org:25)",
            "rcpt@example.org",
            "TLSA lookup error for mx.example.org:25",
        ),
        ("rcpt@example.org", "rcpt@example.org", None),
        # a reason with parentheses of its own: only the first " (" splits, only the final ")" goes
        (
            "rcpt@example.org (host mx.example.org[192.0.2.1] said: 450 4.7.1 busy (in reply to RCPT TO command))",
            "rcpt@example.org",
            "host mx.example.org[192.0.2.1] said: 450 4.7.1 busy (in reply to RCPT TO command)",
        ),
        ("rcpt@example.org ()", "rcpt@example.org", None),
        ("rcpt@example.org (no closing parenthesis", "rcpt@example.org", "no closing parenthesis"),
    ],
)
def test_split_recipient_follows_mailcows_rewrite(text: str, address: str, reason: str | None) -> None:
    assert split_recipient(text) == (address, reason)


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("a@Example.ORG", "example.org"),
        ("a@example.org.", "example.org"),
        ("a@bücher.example", "xn--bcher-kva.example"),
        ('"odd@local"@example.org', "example.org"),
        ("a@[192.0.2.1]", "[192.0.2.1]"),
        ("postmaster", None),
        ("a@", None),
        ("a@exa mple.org", None),
    ],
)
def test_recipient_domain(address: str, domain: str | None) -> None:
    assert recipient_domain(address) == domain


def test_empty_queue_is_an_empty_array_and_braces_mean_the_same() -> None:
    assert parse_mailq([]) == []
    assert parse_mailq({}) == []


@pytest.mark.parametrize("payload", [None, "queue", 3, {"queue_id": "ABC"}])
def test_an_answer_that_is_no_array_is_a_shape_error(payload: Any) -> None:
    with pytest.raises(MailqShapeError):
        parse_mailq(payload)


@pytest.mark.parametrize(
    "bad",
    [
        "not an object",
        None,
        entry(queue_id=12345),
        entry(queue_id="4b1c2d3e4f"),  # Postfix writes upper-case hex
        entry(queue_id="4B1C2D3E4F; postsuper -d ALL"),
        entry(queue_id=""),
        entry(arrival_time="1796000000"),
        entry(arrival_time=True),
        entry(arrival_time=float("nan")),
        entry(arrival_time=10**20),
        entry(queue_name=None),
        entry(recipients="rcpt@example.org"),
        {"queue_id": "ABCDEF"},
    ],
)
def test_malformed_entries_are_skipped_and_the_rest_kept(bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.mailcow"):
        messages = parse_mailq([bad, entry(queue_id="ABCDEF0123")])
    assert [m.queue_id for m in messages] == ["ABCDEF0123"]
    assert "skipped 1 queue entries" in caplog.text
    assert "bob.secret" not in caplog.text and "alice" not in caplog.text


def test_malformed_recipients_are_dropped_and_postfix_objects_understood() -> None:
    [message] = parse_mailq(
        [
            entry(
                recipients=[
                    "one@example.org (Server certificate not trusted)",
                    42,
                    None,
                    "no-at-sign (TLS is required, but was not offered by host mx.example.org[192.0.2.1])",
                    {"address": "two@Example.net", "delay_reason": "Cannot start TLS: handshake failure"},
                    {"address": "three@example.net", "delay_reason": ""},
                    {"delay_reason": "no address"},
                ]
            )
        ]
    )
    assert message.recipients == (
        QueueRecipient("example.org", "Server certificate not trusted"),
        QueueRecipient("example.net", "Cannot start TLS: handshake failure"),
        QueueRecipient("example.net", None),
    )


def test_other_queues_are_kept_and_told_apart() -> None:
    messages = parse_mailq([entry(queue_name="active", queue_id="A1"), entry(queue_name="hold", queue_id="B2")])
    assert [(m.queue_name, m.deferred) for m in messages] == [("active", False), ("hold", False)]


def test_at_most_mailcows_cap_is_kept_and_the_cap_is_visible() -> None:
    payload = [entry(queue_id=f"{n:X}") for n in range(1, MAILQ_CAP + 6)]
    messages = parse_mailq(payload)
    assert len(messages) == MAILQ_CAP
    assert capped(messages)
    assert not capped(messages[:-1])
