"""MailcowClient.get_mailq and .deliver (mailcow-api.md §12) against the stand-in and hand-made answers."""

from __future__ import annotations

import ast
import json
import pathlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.mailcow.errors import MailcowAuthError, MailcowError, MailcowProtocolError, MailcowRejected, MailcowUnavailable
from app.mailcow.mailq import DELIVER_BATCH
from app.mailcow.queue import QueueRecipient
from app.worker.failures import Call, Verdict, verdict
from devtools.mailcow_standin import Fault, MailcowStandin
from tests.standin import BASE, KEY, RO_KEY, assert_no_forbidden_queue_calls, mailcow_client, make_app, standin_of


@pytest.fixture
def app() -> Iterator[Starlette]:
    app = make_app()
    yield app
    assert_no_forbidden_queue_calls(standin_of(app))


@pytest.fixture
def standin(app: Starlette) -> MailcowStandin:
    return standin_of(app)


def queue_calls(standin: MailcowStandin) -> list[dict[str, Any]]:
    return [call for call in standin.calls if call["op"] == "mailq"]


def mocked(text: str, status: int = 200, content_type: str = "application/json") -> Any:
    from app.mailcow.client import MailcowClient

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=text.encode(), headers={"content-type": content_type})

    return MailcowClient(BASE, KEY, transport=httpx.MockTransport(handler), attempts=1)


async def test_get_mailq_reads_the_stand_ins_queue(app: Starlette, standin: MailcowStandin) -> None:
    arrival = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    ids = standin.queue.fill("example.org", 2, 3, "Server certificate not verified", arrival)
    standin.queue.fill("other.example", 1, 1, None, arrival, queue_name="active")
    async with mailcow_client(app) as client:
        messages = await client.get_mailq()
    assert [m.queue_id for m in messages[:2]] == ids
    assert messages[0].arrival_time == arrival
    assert messages[0].recipients == (QueueRecipient("example.org", "Server certificate not verified"),) * 3
    assert messages[2].queue_name == "active" and messages[2].recipients == (QueueRecipient("other.example", None),)
    assert queue_calls(standin)[0]["path"] == "/api/v1/get/mailq/all"


async def test_an_empty_queue_is_empty(app: Starlette) -> None:
    async with mailcow_client(app) as client:
        assert await client.get_mailq() == []


async def test_a_read_only_key_lists_but_cannot_deliver(app: Starlette, standin: MailcowStandin) -> None:
    [queue_id] = standin.queue.fill("example.org")
    async with mailcow_client(app, RO_KEY) as client:
        assert len(await client.get_mailq()) == 1
        with pytest.raises(MailcowAuthError) as caught:
            await client.deliver([queue_id])
    assert caught.value.status == 403
    assert verdict(caught.value, Call.upkeep) is Verdict.pause
    assert len(queue_calls(standin)) == 2  # a 403 is never retried


async def test_unreachable_dockerapi_is_unavailable_and_retried_later(app: Starlette, standin: MailcowStandin) -> None:
    standin.queue.dockerapi = "down"
    async with mailcow_client(app, attempts=2) as client:
        with pytest.raises(MailcowUnavailable) as caught:
            await client.get_mailq()
        with pytest.raises(MailcowUnavailable):
            await client.deliver(["ABC123"])
    assert caught.value.status == 500 and caught.value.op == "mailq"
    assert verdict(caught.value, Call.upkeep) is Verdict.retry
    assert [call["status"] for call in queue_calls(standin)] == [500, 500, 500, 500]


async def test_no_postfix_container_lists_nothing_and_refuses_delivery(app: Starlette, standin: MailcowStandin) -> None:
    standin.queue.fill("example.org")
    standin.queue.dockerapi = "no_postfix"
    async with mailcow_client(app) as client:
        assert await client.get_mailq() == []  # indistinguishable from an empty queue
        with pytest.raises(MailcowRejected, match="unknown"):
            await client.deliver(["ABC123"])


async def test_deliver_releases_only_what_the_current_row_lets_through(app: Starlette, standin: MailcowStandin) -> None:
    stuck = standin.queue.fill("example.org", 3)
    other = standin.queue.fill("other.example", 2)
    async with mailcow_client(app) as client:
        assert await client.deliver(stuck) == 3
        assert len(standin.queue.deferred("example.org")) == 3  # no row: Postfix still says dane
        await client.add_policy("example.org", "dane-only")
        await client.deliver(stuck)
        assert len(standin.queue.deferred("example.org")) == 3  # a row that does not help
        row = await client.find_policy("example.org")
        assert row is not None
        await client.edit_policy(row.id, policy="encrypt", active=0)
        await client.deliver(stuck)
        assert len(standin.queue.deferred("example.org")) == 3  # inactive
        await client.edit_policy(row.id, active=1)
        await client.deliver(stuck)
        remaining = await client.get_mailq()
    assert standin.queue.deferred("example.org") == []
    assert [m.queue_id for m in remaining] == other  # other destinations untouched
    bodies = [json.loads(call["body"]) for call in queue_calls(standin) if call["method"] == "POST"]
    assert bodies[-1] == {"items": stuck, "attr": {"action": "deliver"}}


async def test_a_vanished_id_is_still_success(app: Starlette, standin: MailcowStandin) -> None:
    async with mailcow_client(app) as client:
        assert await client.deliver(["ABCDEF0001"]) == 1


@pytest.mark.parametrize("ids", [["4B1C2D3E4F", "not-hex"], ["4B1C 2D"], [12345], ["4B1C", None], [""], "4B1C2D3E4F"])
async def test_ids_that_are_not_hex_strings_are_refused_before_sending(
    app: Starlette, standin: MailcowStandin, ids: Any
) -> None:
    async with mailcow_client(app) as client:
        with pytest.raises(ValueError, match="queue id"):
            await client.deliver(ids)
    assert queue_calls(standin) == []
    assert verdict(ValueError("x"), Call.add) is Verdict.fail


async def test_ids_are_sent_upper_case_once_each_and_nothing_for_none(app: Starlette, standin: MailcowStandin) -> None:
    [queue_id] = standin.queue.fill("example.org")
    async with mailcow_client(app) as client:
        assert await client.deliver([]) == 0
        assert queue_calls(standin) == []
        assert await client.deliver([queue_id.lower(), queue_id]) == 1
    [call] = queue_calls(standin)
    assert json.loads(call["body"])["items"] == [queue_id]


async def test_thousands_of_ids_go_in_bounded_batches(app: Starlette, standin: MailcowStandin) -> None:
    ids = standin.queue.fill("example.org", 2 * DELIVER_BATCH + 7)
    async with mailcow_client(app) as client:
        await client.add_policy("example.org", "encrypt")
        assert await client.deliver(ids) == len(ids)
        assert await client.deliver(ids[:5], batch_size=2) == 5
        with pytest.raises(ValueError, match="batch size"):
            await client.deliver(ids, batch_size=0)
    sizes = [len(json.loads(call["body"])["items"]) for call in queue_calls(standin) if call["method"] == "POST"]
    assert sizes == [DELIVER_BATCH, DELIVER_BATCH, 7, 2, 2, 1]
    assert standin.queue.deferred() == []


async def test_a_lost_answer_is_retried_and_delivery_is_idempotent(app: Starlette, standin: MailcowStandin) -> None:
    ids = standin.queue.fill("example.org", 2)
    standin.add_fault(Fault(op="mailq", mode="drop_after_commit"))
    async with mailcow_client(app) as client:
        await client.add_policy("example.org", "may")
        assert await client.deliver(ids) == 2
    assert [call["status"] for call in queue_calls(standin)] == [500, 200]
    assert standin.queue.deferred() == []


async def test_task_completed_means_mailcow_did_nothing() -> None:
    async with mocked('{"type":"success","msg":"Task completed"}') as client:
        with pytest.raises(MailcowProtocolError, match="did not confirm"):
            await client.deliver(["ABC"])


async def test_a_number_among_the_ids_would_be_a_danger_answer() -> None:
    danger = '[{"type":"danger","msg":"Error: expected string or bytes-like object, got \'int\'"}]'
    async with mocked(danger) as client:
        with pytest.raises(MailcowRejected, match="expected string"):
            await client.deliver(["ABC"])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"queue_id": "ABC", "sender": "alice.sender@origin.example"}', "expected a JSON array"),
        ('[{"sender": "alice.sender@origin.example", "recipients": ["bob.secret@', "not JSON"),
        ("", "empty body"),
    ],
)
async def test_errors_about_the_queue_never_quote_it(text: str, error: str) -> None:
    async with mocked(text) as client:
        with pytest.raises(MailcowError) as caught:
            await client.get_mailq()
    assert error in str(caught.value)
    assert "alice" not in str(caught.value) and "bob.secret" not in str(caught.value)


async def test_dockerapis_html_page_is_unavailable_not_a_parse_error() -> None:
    async with mocked("<html>Connection to dockerapi container failed</html>", 500, "text/html") as client:
        with pytest.raises(MailcowUnavailable):
            await client.get_mailq()


def _strings_in_code(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """Every string constant of a module except docstrings (which may name what is never sent)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_code_in_app_can_send_flush_super_delete_or_delete_mailq() -> None:
    root = pathlib.Path(__file__).resolve().parents[2] / "app"
    forbidden = re.compile(r"super_delete|\bflush\b|delete/mailq", re.IGNORECASE)
    offenders = [
        f"{path.relative_to(root)}:{line}: {text!r}"
        for path in root.rglob("*.py")
        for line, text in _strings_in_code(path)
        if forbidden.search(text)
    ]
    assert offenders == []
