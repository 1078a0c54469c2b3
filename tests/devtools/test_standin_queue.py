"""The stand-in's mail queue answers as mailcow-api.md §12 says (raw HTTP, no client in between)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devtools.mailcow_standin import MailcowStandin
from devtools.standin_queue import MAILQ_CAP, QueuedMessage, QueuedRecipient
from tests.standin import AUTH, EDIT_MAILQ, MAILQ, RO, assert_no_forbidden_queue_calls, make_app, raw, standin_of

SUCCESS = "queue_command_success"
TASK_COMPLETED = {"type": "success", "msg": "Task completed"}


@pytest.fixture
def app() -> Iterator[Starlette]:
    app = make_app()
    yield app
    # the tests below that send forbidden calls on purpose check and clear them themselves
    assert standin_of(app).queue.forbidden == []


@pytest.fixture
def standin(app: Starlette) -> MailcowStandin:
    return standin_of(app)


async def edit(app: Starlette, body: Any, headers: dict[str, str] = AUTH) -> httpx.Response:
    async with raw(app) as client:
        return await client.post(EDIT_MAILQ, content=json.dumps(body), headers=headers)


def deliver(*ids: Any) -> dict[str, Any]:
    return {"items": list(ids), "attr": {"action": "deliver"}}


async def test_list_is_an_array_with_recipients_rewritten(app: Starlette, standin: MailcowStandin) -> None:
    arrival = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    [first] = standin.queue.fill("example.org", 1, 2, "TLSA lookup error for mx.example.org:25", arrival)
    [second] = standin.queue.fill("example.net", reason=None, arrival_time=arrival)
    async with raw(app) as client:
        answer = await client.get(MAILQ, headers=AUTH)
    assert answer.status_code == 200
    assert answer.json() == [
        {
            "queue_name": "deferred",
            "queue_id": first,
            "arrival_time": int(arrival.timestamp()),
            "message_size": 2048,
            "forced_expire": False,
            "sender": "alice.sender@origin.example",
            "recipients": [
                "rcpt0@example.org (TLSA lookup error for mx.example.org:25)",
                "rcpt1@example.org (TLSA lookup error for mx.example.org:25)",
            ],
        },
        {
            "queue_name": "deferred",
            "queue_id": second,
            "arrival_time": int(arrival.timestamp()),
            "message_size": 2048,
            "forced_expire": False,
            "sender": "alice.sender@origin.example",
            "recipients": ["rcpt0@example.net"],  # no delay reason: the bare address
        },
    ]
    assert all(len(q) == 10 and q.isupper() for q in (first, second))
    # logged and faulted as their own op, apart from the policy map's get
    assert [(c["op"], c["status"]) for c in standin.calls] == [("mailq", 200)]


async def test_empty_queue_is_brackets_and_without_all_an_empty_200(app: Starlette, standin: MailcowStandin) -> None:
    async with raw(app) as client:
        empty = await client.get(MAILQ, headers=AUTH)
        standin.queue.fill("example.org")
        bare = await client.get("/api/v1/get/mailq", headers=AUTH)
    assert (empty.status_code, empty.text) == (200, "[]")
    assert (bare.status_code, bare.text) == (200, "")


async def test_messages_can_share_recipients(app: Starlette, standin: MailcowStandin) -> None:
    standin.queue.fill("example.org", 4, 2, distinct_recipients=3)
    async with raw(app) as client:
        listed = (await client.get(MAILQ, headers=AUTH)).json()
    assert [m["recipients"] for m in listed] == [
        [f"rcpt{n}@example.org (Server certificate not verified)" for n in pair]
        for pair in ((0, 1), (2, 0), (1, 2), (0, 1))
    ]


async def test_at_most_ten_thousand_are_listed(app: Starlette, standin: MailcowStandin) -> None:
    standin.queue.fill("example.org", MAILQ_CAP + 3)
    async with raw(app) as client:
        answer = await client.get(MAILQ, headers=AUTH)
    assert len(answer.json()) == MAILQ_CAP


async def test_read_only_key_lists_but_edit_is_403(app: Starlette, standin: MailcowStandin) -> None:
    [queue_id] = standin.queue.fill("example.org")
    async with raw(app) as client:
        listed = await client.get(MAILQ, headers=RO)
    answer = await edit(app, deliver(queue_id), RO)
    assert listed.status_code == 200 and len(listed.json()) == 1
    assert answer.status_code == 403
    assert answer.json() == {"type": "error", "msg": "API read/write access denied"}
    assert standin.queue.commands == []


async def test_non_hex_ids_are_dropped_silently_and_still_listed(app: Starlette, standin: MailcowStandin) -> None:
    standin.seed_row("example.org", "encrypt")
    [queue_id] = standin.queue.fill("example.org")
    answer = await edit(app, deliver("ZZZ-not-hex", "4B1C; postsuper -d ALL"))
    assert answer.status_code == 200
    assert answer.json() == [
        {
            "type": "success",
            "log": [
                "process_mailq_output",
                "edit",
                {"qid": ["ZZZ-not-hex", "4B1C; postsuper -d ALL"], "action": "deliver"},
            ],
            "msg": SUCCESS,
        }
    ]
    assert [m.queue_id for m in standin.queue.deferred()] == [queue_id]  # nothing happened
    answer = await edit(app, deliver("ABCDEF9999", queue_id))  # a vanished id among them: success
    assert answer.json()[0]["msg"] == SUCCESS
    assert standin.queue.deferred() == []
    assert standin.queue.delivered == [(queue_id, "example.org")]


@pytest.mark.parametrize(
    "body",
    [
        deliver(),
        {"items": [], "attr": {"action": "deliver"}},
        {"attr": {"action": "deliver"}},
        {"items": ["ABC"], "attr": {"action": "requeue"}},
        {"items": ["ABC"], "attr": {}},
    ],
)
async def test_empty_items_or_unknown_action_is_task_completed(
    app: Starlette, standin: MailcowStandin, body: dict[str, Any]
) -> None:
    standin.seed_row("example.org", "encrypt")
    standin.queue.fill("example.org")
    answer = await edit(app, body)
    assert (answer.status_code, answer.json()) == (200, TASK_COMPLETED)
    assert len(standin.queue.deferred()) == 1


async def test_a_number_id_is_a_danger_answer_and_does_nothing(app: Starlette, standin: MailcowStandin) -> None:
    standin.seed_row("example.org", "encrypt")
    [queue_id] = standin.queue.fill("example.org")
    answer = await edit(app, deliver(queue_id, 12345))
    [entry] = answer.json()
    assert (entry["type"], entry["msg"]) == ("danger", "Error: expected string or bytes-like object, got 'int'")
    assert len(standin.queue.deferred()) == 1


async def test_deliver_goes_through_only_when_the_current_row_lets_it(app: Starlette, standin: MailcowStandin) -> None:
    [stuck] = standin.queue.fill("example.org", deliverable_under={"may", "encrypt"})
    await edit(app, deliver(stuck))
    assert len(standin.queue.deferred("example.org")) == 1  # no row
    row = standin.seed_row("EXAMPLE.org", "dane-only")
    await edit(app, deliver(stuck))
    assert len(standin.queue.deferred("example.org")) == 1  # the row does not help
    standin.table.rows[row["id"]].policy = "none"
    await edit(app, deliver(stuck))
    assert len(standin.queue.deferred("example.org")) == 1  # not among this message's deliverable policies
    standin.table.rows[row["id"]].policy, standin.table.rows[row["id"]].active = "may", 0
    await edit(app, deliver(stuck))
    assert len(standin.queue.deferred("example.org")) == 1  # inactive
    standin.table.rows[row["id"]].active = 1
    await edit(app, deliver(stuck))
    assert standin.queue.deferred("example.org") == []


async def test_a_message_to_two_domains_keeps_those_still_stuck(app: Starlette, standin: MailcowStandin) -> None:
    message = QueuedMessage(
        "ABCDEF0001",
        "deferred",
        1_796_000_000,
        "alice.sender@origin.example",
        [
            QueuedRecipient("a@example.org", "Server certificate not verified"),
            QueuedRecipient("b@example.net", "TLSA lookup error for mx.example.net:25"),
        ],
    )
    standin.queue.add_message(message)
    standin.seed_row("example.org", "encrypt")
    await edit(app, deliver("ABCDEF0001"))
    async with raw(app) as client:
        [left] = (await client.get(MAILQ, headers=AUTH)).json()
    assert left["recipients"] == ["b@example.net (TLSA lookup error for mx.example.net:25)"]


async def test_hold_and_unhold(app: Starlette, standin: MailcowStandin) -> None:
    [queue_id] = standin.queue.fill("example.org")
    await edit(app, {"items": [queue_id], "attr": {"action": "hold"}})
    assert standin.queue.deferred() == [] and standin.queue.messages[queue_id].queue_name == "hold"
    await edit(app, {"items": [queue_id], "attr": {"action": "unhold"}})
    assert [m.queue_id for m in standin.queue.deferred()] == [queue_id]


@pytest.mark.parametrize("action", ["flush", "super_delete"])
async def test_flush_and_super_delete_are_recorded_as_forbidden(
    app: Starlette, standin: MailcowStandin, action: str
) -> None:
    standin.queue.fill("example.org", 3)
    answer = await edit(app, {"items": ["x"], "attr": {"action": action}})
    assert answer.json()[0]["msg"] == SUCCESS
    assert [c.action for c in standin.queue.forbidden] == [action]
    if action == "super_delete":
        assert standin.queue.messages == {}  # what mailcow does: every queued message is gone
    standin.queue.forbidden.clear()


async def test_delete_mailq_is_recorded_as_forbidden(app: Starlette, standin: MailcowStandin) -> None:
    [queue_id] = standin.queue.fill("example.org")
    async with raw(app) as client:
        answer = await client.post("/api/v1/delete/mailq", content=json.dumps([queue_id]), headers=AUTH)
    assert answer.status_code == 200
    assert [(c.action, c.items) for c in standin.queue.forbidden] == [("delete", [queue_id])]
    assert standin.queue.messages == {}
    standin.queue.forbidden.clear()


def test_the_teardown_check_fails_a_test_that_sent_a_forbidden_call() -> None:
    standin = standin_of(make_app())
    assert_no_forbidden_queue_calls(standin)
    standin.queue.edit(["A"], {"action": "flush"})
    with pytest.raises(AssertionError, match="forbidden mail queue calls reached the stand-in"):
        assert_no_forbidden_queue_calls(standin)


async def test_unreachable_dockerapi_and_missing_postfix(app: Starlette, standin: MailcowStandin) -> None:
    standin.queue.fill("example.org")
    standin.queue.dockerapi = "down"
    async with raw(app) as client:
        listed = await client.get(MAILQ, headers=AUTH)
    edited = await edit(app, deliver("ABC"))
    for answer in (listed, edited):
        assert answer.status_code == 500
        assert answer.headers["content-type"].startswith("text/html")
        assert "Connection to dockerapi container failed" in answer.text
    standin.queue.dockerapi = "no_postfix"
    async with raw(app) as client:
        assert (await client.get(MAILQ, headers=AUTH)).json() == []
    assert (await edit(app, deliver("ABC"))).json()[0] == {
        "type": "danger",
        "log": ["process_mailq_output", "edit", {"qid": ["ABC"], "action": "deliver"}],
        "msg": "unknown",
    }


async def test_control_api_fills_lists_and_empties_the_queue(app: Starlette, standin: MailcowStandin) -> None:
    async with raw(app) as client:
        filled = await client.post(
            "/__standin__/queue",
            json={
                "domain": "example.org",
                "messages": 2,
                "reason": "Server certificate not trusted",
                "arrival_time": 1_796_000_000,
            },
        )
        bad = await client.post("/__standin__/queue", json={"messages": 2})
        shown = (await client.get("/__standin__/queue")).json()
        await client.delete("/__standin__/queue")
        reset = await client.post("/__standin__/reset")
    assert filled.status_code == 201 and len(filled.json()["queue_ids"]) == 2
    assert bad.status_code == 422
    assert [m["arrival_time"] for m in shown["messages"]] == [1_796_000_000] * 2
    assert shown["forbidden"] == [] and reset.status_code == 200
    assert standin.queue.messages == {}
