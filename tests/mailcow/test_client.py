"""MailcowClient against the stand-in (ASGI and a real socket) and against hand-made answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from starlette.applications import Starlette

from app.mailcow.client import MailcowClient, PolicyRow
from app.mailcow.errors import (
    MailcowAuthError,
    MailcowEmptyResponse,
    MailcowError,
    MailcowProtocolError,
    MailcowRejected,
    MailcowUnavailable,
)
from devtools.mailcow_standin import MailcowStandin, StandinKey
from tests.helpers import free_port
from tests.standin import BASE, KEY, RO_KEY, mailcow_client, make_app, served, standin_of


@pytest.fixture
def app() -> Starlette:
    return make_app()


@pytest.fixture
def standin(app: Starlette) -> MailcowStandin:
    return standin_of(app)


def fault(standin: MailcowStandin, op: str, mode: str, count: int = 1, delay: float = 0.0) -> None:
    from devtools.mailcow_standin import Fault

    standin.add_fault(Fault(op, mode, count, delay))


def api_calls(standin: MailcowStandin) -> list[dict[str, Any]]:
    return [call for call in standin.calls if call["op"] != "other"]


def mocked(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> MailcowClient:
    kwargs.setdefault("backoff_initial", 0.001)
    kwargs.setdefault("backoff_max", 0.002)
    return MailcowClient(BASE, KEY, transport=httpx.MockTransport(handler), **kwargs)


def answer(text: str, status: int = 200, content_type: str = "application/json") -> Callable[..., httpx.Response]:
    return lambda request: httpx.Response(status, content=text.encode(), headers={"content-type": content_type})


# ---- the happy path -----------------------------------------------------------------------------


async def test_add_find_get_list_edit_delete(app: Starlette, standin: MailcowStandin) -> None:
    async with mailcow_client(app) as client:
        assert await client.list_policies() == []  # mailcow says {}
        await client.add_policy("Bücher.Example", "encrypt", "protocols=>=TLSv1.2")
        row = await client.find_policy("bücher.example")
        assert row is not None
        assert row == PolicyRow(row.id, "xn--bcher-kva.example", "encrypt", "protocols=>=TLSv1.2", 1, row.created, None)
        assert await client.find_policy("XN--BCHER-KVA.example") == row
        assert await client.get_policy(row.id) == row  # the stray "0": null is ignored
        assert await client.get_policy(row.id + 1) is None
        assert await client.list_policies() == [row]
        await client.edit_policy(row.id, policy="dane-only", active=0, parameters="")
        edited = await client.get_policy(row.id)
        assert edited is not None
        assert (edited.policy, edited.active, edited.parameters) == ("dane-only", 0, "")
        await client.delete_policies([row.id])
        assert await client.find_policy("bücher.example") is None
    add_call = next(call for call in standin.calls if call["op"] == "add")
    assert json.loads(add_call["body"])["active"] == 1  # always sent: a missing active is inactive


async def test_add_inactive_stores_the_row_inactive_in_one_call(app: Starlette, standin: MailcowStandin) -> None:
    async with mailcow_client(app) as client:
        await client.add_policy("example.org", "may", active=False)
        row = await client.find_policy("example.org")
    assert row is not None and row.active == 0
    assert [(state["op"], state["active"]) for state in standin.history()] == [("insert", 0)]
    assert [call["op"] for call in api_calls(standin)] == ["add", "get"]


async def test_find_policy_matches_like_the_collation(app: Starlette, standin: MailcowStandin) -> None:
    standin.seed_row("Mixed.Example ", "may")
    standin.seed_row(".sub.example", "encrypt")
    async with mailcow_client(app) as client:
        found = await client.find_policy("mixed.example")
        assert found is not None
        assert found.dest == "Mixed.Example "
        assert (await client.find_policy(".SUB.example")) is not None
        assert await client.find_policy("sub.example") is None


async def test_delete_of_an_unknown_id_is_reported_as_mailcow_says(app: Starlette, standin: MailcowStandin) -> None:
    async with mailcow_client(app) as client:
        await client.delete_policies([424242])  # mailcow "succeeds"; callers verify with get/find
        await client.delete_policies([])  # nothing to send
    assert [call["body"] for call in api_calls(standin)] == ["[424242]"]


# ---- mailcow says no ----------------------------------------------------------------------------


async def test_add_existing_dest_is_rejected_with_entry_exists(app: Starlette) -> None:
    async with mailcow_client(app) as client:
        await client.add_policy("example.org", "encrypt")
        with pytest.raises(MailcowRejected) as caught:
            await client.add_policy("EXAMPLE.org", "may")
    assert caught.value.msg_key == "tls_policy_map_entry_exists"
    assert caught.value.msg_args == ("example.org",)
    assert caught.value.retried is False
    assert 'A TLS policy map entry "example.org" exists' in str(caught.value)


@pytest.mark.parametrize(
    ("dest", "parameters", "key"),
    [
        (".example.org", "", "tls_policy_map_dest_invalid"),
        ("example.org", "protocols", "tls_policy_map_parameter_invalid"),
        ("example.org", "a=b  c=d", "tls_policy_map_parameter_invalid"),
    ],
)
async def test_add_validation_failures_are_rejections(app: Starlette, dest: str, parameters: str, key: str) -> None:
    async with mailcow_client(app) as client:
        with pytest.raises(MailcowRejected) as caught:
            await client.add_policy(dest, "encrypt", parameters)
    assert caught.value.msg_key == key
    assert caught.value.kind == "rejected"


async def test_edit_errors(app: Starlette, standin: MailcowStandin) -> None:
    a = standin.seed_row("a.example")["id"]
    standin.seed_row("b.example")
    async with mailcow_client(app) as client:
        with pytest.raises(MailcowRejected) as caught:
            await client.edit_policy(999, active=1)
        assert caught.value.msg_key == "access_denied"
        with pytest.raises(MailcowRejected) as caught:
            await client.edit_policy(a, dest="b.example")
        # mailcow says recipient_map_entry_exists; callers get the tls key
        assert (caught.value.msg_key, caught.value.raw_msg_key) == (
            "tls_policy_map_entry_exists",
            "recipient_map_entry_exists",
        )
        with pytest.raises(MailcowRejected) as caught:
            await client.edit_policy(a, dest="*")
        assert caught.value.msg_key == "tls_policy_map_dest_invalid"
        await client.edit_policy(a, dest=".a.example")  # only edit can store the subdomain form
        assert (await client.get_policy(a)) is not None


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("add_policy", {"dest": "x.org", "policy": "bogus"}),
        ("add_policy", {"dest": "x.org", "policy": ""}),
        ("add_policy", {"dest": " ", "policy": "may"}),
        ("add_policy", {"dest": "x.org", "policy": "may", "parameters": "0"}),
        ("add_policy", {"dest": "x.org", "policy": "may", "parameters": "a=" + "b" * 254}),
        ("edit_policy", {"id": 1, "dest": "Upper.example"}),
        ("edit_policy", {"id": 1, "dest": " x.org"}),
        ("edit_policy", {"id": 1, "dest": "bücher.example"}),
        ("edit_policy", {"id": 1, "dest": ""}),
        ("edit_policy", {"id": 1, "policy": ""}),
        ("edit_policy", {"id": 1, "active": 2}),
        ("edit_policy", {"id": 1, "created": "x"}),
        ("edit_policy", {"id": 1}),
        ("get_policy", {"id": 0}),
        ("delete_policies", {"ids": [True]}),
    ],
)
async def test_inputs_mailcow_would_answer_uninformatively_are_refused(
    app: Starlette, standin: MailcowStandin, call: str, kwargs: dict[str, Any]
) -> None:
    async with mailcow_client(app) as client:
        with pytest.raises(ValueError):
            await getattr(client, call)(**kwargs)
    assert api_calls(standin) == []


async def test_empty_body_is_an_empty_response_error(app: Starlette, standin: MailcowStandin) -> None:
    standin.seed_row("EXAMPLE.org")  # stored verbatim by someone's edit: the unique index ignores case
    async with mailcow_client(app) as client:
        with pytest.raises(MailcowEmptyResponse) as caught:
            await client.add_policy("example.org", "encrypt")
        assert caught.value.kind == "empty_response"
        fault(standin, "get", "empty")
        with pytest.raises(MailcowEmptyResponse):
            await client.list_policies()
    assert len(api_calls(standin)) == 2  # not retried


# ---- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["WRONG-KEY", "ABCDEF"])
async def test_bad_key_is_never_retried(app: Starlette, standin: MailcowStandin, key: str) -> None:
    async with mailcow_client(app, key=key, attempts=5) as client:
        with pytest.raises(MailcowAuthError) as caught:
            await client.list_policies()
    assert caught.value.status == 401
    assert "authentication failed" in str(caught.value)
    assert len(api_calls(standin)) == 1


async def test_ip_denied_and_read_only_are_auth_errors(app: Starlette, standin: MailcowStandin) -> None:
    standin.set_key(StandinKey("FAR-KEY", allow_from=["192.0.2.0/24"]))
    async with mailcow_client(app, key="FAR-KEY") as client:
        with pytest.raises(MailcowAuthError, match=r"api access denied for ip 127\.0\.0\.1"):
            await client.list_policies()
    async with mailcow_client(app, key=RO_KEY, attempts=3) as client:
        assert await client.list_policies() == []
        with pytest.raises(MailcowAuthError) as caught:
            await client.add_policy("example.org", "may")
        assert caught.value.status == 403
    assert len(api_calls(standin)) == 3


async def test_client_never_sends_cookies(app: Starlette, standin: MailcowStandin) -> None:
    standin.seed_row("OTHER.org")
    async with mailcow_client(app) as client:
        await client.add_policy("example.org", "may")
        with pytest.raises(MailcowEmptyResponse):
            await client.add_policy("other.org", "may")  # a DB error, kept in that call's session
        await client.add_policy("third.org", "may")  # so no stale error reaches this one
        await client.list_policies()
    assert [call["cookie_sent"] for call in api_calls(standin)] == [False] * 4
    assert {call["auth"] for call in api_calls(standin)} == {"key-rw"}


async def test_stale_session_errors_are_ignored() -> None:
    stale = {
        "type": "danger",
        "log": ["exception_handler"],
        "msg": ["mysql_error", {"errorInfo": ["01000", 1265, "x"]}],
    }
    saved = {
        "type": "success",
        "log": ["tls_policy_maps", "add", {}, None],
        "msg": ["tls_policy_map_entry_saved", "a.b"],
    }
    async with mocked(answer(json.dumps([stale, saved]))) as client:
        await client.add_policy("a.b", "may")


# ---- answers the client does not understand -----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "text", "content_type"),
    [
        (404, '{"type":"error","msg":"route not found"}', "application/json"),
        (405, '{"type":"error","msg":"only GET method is allowed"}', "application/json"),
        (400, '{"type":"error","msg":"Request body doesn\'t contain valid json!"}', "application/json"),
        (302, "", "text/html"),
        (200, "<html>login</html>", "text/html"),
        (200, '"just a string"', "application/json"),
        (200, '{"id": 1}', "application/json"),
        (200, '[{"id": "x", "dest": 1}]', "application/json"),
    ],
)
async def test_unexpected_answers_are_protocol_errors(status: int, text: str, content_type: str) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return answer(text, status, content_type)(request)

    async with mocked(handler) as client:
        with pytest.raises(MailcowProtocolError):
            await client.list_policies()
    assert calls == 1


async def test_generic_answers() -> None:
    async with mocked(answer('{"type":"error","msg":"Cannot find attributes in post data"}')) as client:
        with pytest.raises(MailcowProtocolError, match="no attributes"):
            await client.add_policy("a.example", "may")
    async with mocked(answer('{"type":"error","msg":"Cannot add item"}')) as client:
        with pytest.raises(MailcowAuthError, match="Cannot add item"):  # the key never arrived: pause
            await client.add_policy("a.example", "may")
    async with mocked(answer('{"type":"success","msg":"Task completed"}')) as client:
        with pytest.raises(MailcowProtocolError, match="did not confirm"):
            await client.delete_policies([3])
    async with mocked(answer('{"type":"error","msg":"Cannot delete item"}')) as client:
        with pytest.raises(MailcowRejected):
            await client.delete_policies([3])
    row = '{"id":"1","dest":"a.example","policy":"may","parameters":null,"active":"1","created":"x","modified":null}'
    async with mocked(answer(f"[{row}]")) as client:  # the stale OpenAPI example's string types
        assert (await client.list_policies())[0] == PolicyRow(1, "a.example", "may", "", 1, "x", None)
    async with mocked(answer(row)) as client:
        with pytest.raises(MailcowProtocolError, match="asked for id 2"):
            await client.get_policy(2)


# ---- retries ------------------------------------------------------------------------------------


async def test_500_then_success_is_retried(app: Starlette, standin: MailcowStandin) -> None:
    fault(standin, "get", "http500")
    async with mailcow_client(app, attempts=3) as client:
        assert await client.list_policies() == []
    assert [call["status"] for call in api_calls(standin)] == [500, 200]


async def test_attempts_exhausted_is_unavailable(app: Starlette, standin: MailcowStandin) -> None:
    fault(standin, "any", "http500", count=10)
    async with mailcow_client(app, attempts=3) as client:
        with pytest.raises(MailcowUnavailable, match="gave up after 3 attempts") as caught:
            await client.delete_policies([1])
    assert caught.value.kind == "unavailable"
    assert len(api_calls(standin)) == 3


async def test_lost_add_response_surfaces_entry_exists(app: Starlette, standin: MailcowStandin) -> None:
    fault(standin, "add", "drop_after_commit")  # applied, then answered 500
    async with mailcow_client(app, attempts=3) as client:
        with pytest.raises(MailcowRejected) as caught:
            await client.add_policy("example.org", "encrypt")
        assert (caught.value.msg_key, caught.value.retried) == ("tls_policy_map_entry_exists", True)
        assert await client.find_policy("example.org") is not None  # how the worker adopts it


async def test_real_socket_timeout_and_connection_refused(app: Starlette, standin: MailcowStandin) -> None:
    with served(app) as base:
        async with MailcowClient(base, KEY, timeout=2, backoff_initial=0.001) as client:
            await client.add_policy("example.org", "may")
            assert [row.dest for row in await client.list_policies()] == ["example.org"]
        fault(standin, "get", "timeout", delay=0.9)
        async with MailcowClient(base, KEY, timeout=0.3, attempts=2, backoff_initial=0.001) as client:
            assert [row.dest for row in await client.list_policies()] == ["example.org"]  # second attempt
            fault(standin, "get", "timeout", count=2, delay=0.6)
            with pytest.raises(MailcowUnavailable, match="ReadTimeout"):
                await client.list_policies()
    async with MailcowClient(f"http://127.0.0.1:{free_port()}", KEY, attempts=2, backoff_initial=0.001) as client:
        with pytest.raises(MailcowUnavailable, match="ConnectError") as caught:
            await client.get_policy(1)
    assert "gave up after 2 attempts" in str(caught.value)


# ---- the key stays secret; metrics --------------------------------------------------------------


async def test_api_key_never_appears_in_logs_errors_or_metrics(
    app: Starlette, standin: MailcowStandin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.mailcow")
    errors: list[MailcowError] = []
    fault(standin, "get", "http500", count=2)
    async with mailcow_client(app, attempts=2) as client:
        assert KEY not in repr(client)
        for coroutine in (
            client.list_policies(),
            client.add_policy(".bad", "may"),
            client.add_policy("x.org", "may"),
            client.add_policy("x.org", "may"),
        ):
            try:
                await coroutine
            except MailcowError as exc:
                errors.append(exc)
    async with mailcow_client(app, key=KEY + "x") as client:
        try:
            await client.list_policies()
        except MailcowError as exc:
            errors.append(exc)
    async with MailcowClient(f"http://127.0.0.1:{free_port()}", KEY, attempts=1) as client:
        try:
            await client.list_policies()
        except MailcowError as exc:
            errors.append(exc)
    with pytest.raises(ValueError) as bad_key:
        MailcowClient(BASE, KEY + "\n" + KEY)
    assert [type(e) for e in errors] == [
        MailcowUnavailable,
        MailcowRejected,
        MailcowRejected,
        MailcowAuthError,
        MailcowUnavailable,
    ]
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [str(bad_key.value)]
    texts += [record.getMessage() for record in caplog.records] + [repr(record.__dict__) for record in caplog.records]
    assert caplog.records
    assert all(KEY not in text and "ABCDEF" not in text for text in texts)
    assert KEY.encode() not in generate_latest(REGISTRY)


async def test_metrics(app: Starlette, standin: MailcowStandin) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = value("tlso_mailcow_calls_total", target="metrics-test", op="list", outcome="ok")
    before_err = value("tlso_mailcow_errors_total", target="metrics-test", kind="rejected")
    before_retry = value("tlso_mailcow_retries_total", target="metrics-test", op="list")
    fault(standin, "get", "http500")
    async with mailcow_client(app, name="metrics-test") as client:
        await client.list_policies()
        with pytest.raises(MailcowRejected):
            await client.add_policy(".bad", "may")
    assert value("tlso_mailcow_calls_total", target="metrics-test", op="list", outcome="ok") == before_ok + 1
    assert value("tlso_mailcow_errors_total", target="metrics-test", kind="rejected") == before_err + 1
    assert value("tlso_mailcow_calls_total", target="metrics-test", op="add", outcome="rejected") >= 1
    assert value("tlso_mailcow_retries_total", target="metrics-test", op="list") == before_retry + 1
    assert value("tlso_mailcow_call_seconds_count", target="metrics-test", op="list") >= 1
