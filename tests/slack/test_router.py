"""Slack in the service, as Slack calls it: signed form posts to /slack/interactions and /slack/commands
(verified with slack_sdk, Slack's documented example included), replays refused, Slack users mapped to
people, clicks recorded `via` Slack under the no-self-approval rule, and the messages Slack gets back
(response_url; chat.postMessage and chat.update from the notifier), received by real HTTP servers here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from slack_sdk.signature import SignatureVerifier
from sqlalchemy.engine import Engine

from app.core.config import Settings
from app.core.errors import SlackRequestRefused
from app.notify.service import deliver
from app.notify.slack_blocks import APPROVE, REJECT
from app.slack import service as slack
from app.slack.commands import CommandError, parse
from tests.helpers import COMMENT, LiveServer, assert_problem, audit_rows, counts, load, make_settings

dumps = partial(json.dumps, ensure_ascii=False)

# Slack's documented example ("Verifying requests from Slack"): its signing secret, timestamp, body, signature.
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DOC_TIMESTAMP = "1531420618"
DOC_BODY = (
    "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&"
    "channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&"
    "response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
    "trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
DOC_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
TEAM = "T1DC2JH3J"
USERS = {"U0ALICE": "alice", "U0BOB": "bob", "U0CAROL": {"person": "carol", "roles": ["requester"]}}
BOT_TOKEN = "xoxb-test-token"


class SlackSide:
    """Slack's side of the conversation: response_url and the Web API, as real HTTP on loopback."""

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.api: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/response")
        async def response(request: Request) -> dict[str, Any]:
            self.responses.append(await request.json())
            return {"ok": True}

        @app.post("/api/{method}")
        async def api(method: str, request: Request) -> dict[str, Any]:
            body = await request.json()
            self.api.append({"method": method, "body": body, "auth": request.headers.get("authorization")})
            return {"ok": True, "channel": body["channel"], "ts": body.get("ts") or f"1700000000.{len(self.api):06d}"}

        self.server = LiveServer(app)

    @property
    def response_url(self) -> str:
        return f"{self.server.url}/response"


@pytest.fixture
def slack_side() -> Iterator[SlackSide]:
    side = SlackSide()
    with side.server:
        yield side


@pytest.fixture
def settings(slack_side: SlackSide) -> Settings:
    return make_settings(
        slack_signing_secret=SECRET,
        slack_users=USERS,
        slack_team_id=TEAM,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=f"{slack_side.server.url}/api/",
        public_base_url="https://tlso.example.com",
        notify_webhooks={"reviewers": {"format": "slack", "channel": "C0REVIEW"}},
        retry_initial_seconds=0.0,
    )


def signed(body: str, timestamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": SignatureVerifier(secret).generate_signature(timestamp=ts, body=body) or "",
    }


def command(client: TestClient, user: str, text: str) -> dict[str, Any]:
    body = urlencode({"team_id": TEAM, "user_id": user, "command": "/tlso", "text": text, "response_url": "x"})
    response = client.post("/slack/commands", content=body, headers=signed(body))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def click(client: TestClient, user: str, button: dict[str, Any], response_url: str) -> httpx.Response:
    payload = {
        "type": "block_actions",
        "team": {"id": TEAM},
        "user": {"id": user, "name": "Display Name Is Never Trusted"},
        "channel": {"id": "C0REVIEW", "name": "mail-reviews"},
        "response_url": response_url,
        "trigger_id": f"{time.monotonic_ns()}.47445629121",  # every click is a new request
        "actions": [{"action_id": button["action_id"], "value": button["value"], "type": "button"}],
    }
    body = urlencode({"payload": json.dumps(payload)})
    response: httpx.Response = client.post("/slack/interactions", content=body, headers=signed(body))
    return response


def buttons(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        element["action_id"]: element
        for block in message["blocks"]
        if block["type"] == "actions"
        for element in block["elements"]
    }


def header(message: dict[str, Any]) -> str:
    return str(message["blocks"][0]["text"]["text"])


def seen_rows(engine: Engine) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM slack_request_seen")).scalar_one())


# ---------------------------------------------------------------------------------------------------------------
# Is it Slack?


def test_slacks_documented_example_verifies_and_is_taken_once(engine: Engine, settings: Settings) -> None:
    headers = {"x-slack-request-timestamp": DOC_TIMESTAMP, "x-slack-signature": DOC_SIGNATURE}
    at = int(DOC_TIMESTAMP) + 30  # Slack's clock when it sent it
    slack.verify(engine, settings, DOC_BODY.encode(), headers, now=at)
    with pytest.raises(SlackRequestRefused, match="before"):
        slack.verify(engine, settings, DOC_BODY.encode(), headers, now=at)  # a replay within the window
    with pytest.raises(SlackRequestRefused, match="does not match"):
        slack.verify(engine, settings, DOC_BODY.encode(), headers, now=int(DOC_TIMESTAMP) + 301)  # stale
    tampered = DOC_BODY.replace("roadrunner", "wileecoyote").encode()
    with pytest.raises(SlackRequestRefused):
        slack.verify(engine, settings, tampered, headers, now=at)
    assert seen_rows(engine) == 1


def test_forged_stale_and_replayed_requests_are_refused_and_change_nothing(
    engine: Engine, client: TestClient, make_override: Any
) -> None:
    override = make_override("alice")
    body = urlencode({"team_id": TEAM, "user_id": "U0BOB", "text": f"approve {override['id']} Looks right."})
    before = counts(engine)
    forged = client.post("/slack/commands", content=body, headers=signed(body, secret="not-the-secret"))
    stale = client.post("/slack/commands", content=body, headers=signed(body, timestamp=int(time.time()) - 301))
    unsigned = client.post(
        "/slack/commands", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    for refused in (forged, stale, unsigned):
        problem = assert_problem(refused, 401)
        assert problem["type"].endswith("/slack-signature") and "www-authenticate" not in refused.headers
    assert counts(engine) == before and seen_rows(engine) == 0  # the documented example replayed live: stale too
    assert_problem(
        client.post(
            "/slack/commands",
            content=DOC_BODY,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": DOC_TIMESTAMP,
                "X-Slack-Signature": DOC_SIGNATURE,
            },
        ),
        401,
    )

    headers = signed(body)
    first = client.post("/slack/commands", content=body, headers=headers)
    assert first.status_code == 200 and "Approved by you" in dumps(first.json()), first.text
    after = counts(engine)
    replayed = client.post("/slack/commands", content=body, headers=headers)
    assert_problem(replayed, 401)
    assert counts(engine) == after and load(engine, override["id"]).state == "approved"


def test_another_workspace_is_refused(client: TestClient) -> None:
    body = urlencode({"team_id": "T0OTHER", "user_id": "U0BOB", "text": "list"})
    assert_problem(client.post("/slack/commands", content=body, headers=signed(body)), 401)


def test_without_a_signing_secret_slack_is_off(engine: Engine, idp: Any) -> None:
    from app.main import create_app

    with TestClient(create_app(make_settings(), engine=engine, dev_idp=idp)) as plain:
        body = urlencode({"text": "list"})
        assert_problem(plain.post("/slack/commands", content=body, headers=signed(body)), 404)


# ---------------------------------------------------------------------------------------------------------------
# Buttons


def test_a_mapped_reviewers_click_approves_via_slack_and_updates_the_message(
    engine: Engine, client: TestClient, make_override: Any, slack_side: SlackSide
) -> None:
    override = make_override("alice", policy="none", destination="plain.example")  # two approvals needed
    shown = command(client, "U0BOB", f"show #{override['id']}")
    assert header(shown) == f"TLS override #{override['id']} · pending"
    approve = buttons(shown)[APPROVE]
    assert json.loads(approve["value"]) == {"override": override["id"], "version": 1}

    answered = click(client, "U0BOB", approve, slack_side.response_url)
    assert (answered.status_code, answered.content) == (200, b"")  # what Slack expects: an empty 200
    current = load(engine, override["id"])
    assert current.state == "pending" and current.version == 2  # one of two approvals
    rows = audit_rows(engine, "vote.approve")
    assert [(r["actor"], r["via"]) for r in rows] == [("bob", "slack")]
    assert audit_rows(engine, "override.approval_recorded")[0]["via"] == "slack"

    until_count(slack_side.responses, 1)
    (update,) = slack_side.responses
    assert update["replace_original"] is True
    assert "1 of 2" in dumps(update["blocks"]) and "Approved by bob via Slack" in dumps(update["blocks"])
    assert json.loads(buttons(update)[APPROVE]["value"]) == {"override": override["id"], "version": 2}

    # The same button again (an old copy of the message): bob has voted already, and nothing changes.
    click(client, "U0BOB", approve, slack_side.response_url)
    until_count(slack_side.responses, 2)
    assert load(engine, override["id"]).version == 2
    assert "Not approved" in dumps(slack_side.responses[1])


def test_the_requesters_own_click_is_refused_and_on_record(
    engine: Engine, client: TestClient, make_override: Any, slack_side: SlackSide
) -> None:
    override = make_override("alice")
    approve = buttons(command(client, "U0BOB", f"show {override['id']}"))[APPROVE]
    before = counts(engine)
    assert click(client, "U0ALICE", approve, slack_side.response_url).status_code == 200
    assert load(engine, override["id"]).state == "pending"
    after = counts(engine)
    assert (after["vote"], after["override"]) == (before["vote"], before["override"])
    (refusal,) = audit_rows(engine, "auth.refused")
    assert (refusal["actor"], refusal["via"], refusal["comment"]) == (
        "alice",
        "slack",
        "Nobody may decide on their own request.",
    )
    until_count(slack_side.responses, 1)
    assert slack_side.responses[0]["response_type"] == "ephemeral"
    assert "own request" in slack_side.responses[0]["text"]


def test_an_unmapped_slack_user_is_refused(
    engine: Engine, client: TestClient, make_override: Any, slack_side: SlackSide
) -> None:
    override = make_override("alice")
    reject = buttons(command(client, "U0BOB", f"show {override['id']}"))[REJECT]
    before = counts(engine)
    assert click(client, "U0MALLORY", reject, slack_side.response_url).status_code == 200
    assert load(engine, override["id"]).state == "pending" and counts(engine)["vote"] == before["vote"]
    (refusal,) = audit_rows(engine, "auth.refused")
    assert (refusal["actor"], refusal["via"]) == ("slack:U0MALLORY", "slack")
    until_count(slack_side.responses, 1)
    assert "TLSO_SLACK_USERS" in slack_side.responses[0]["text"]
    assert "not linked" in command(client, "U0MALLORY", "list")["text"]


def test_a_click_on_an_outdated_message_shows_the_current_state(
    engine: Engine, client: TestClient, make_override: Any, auth: Any, slack_side: SlackSide
) -> None:
    override = make_override("alice")
    reject = buttons(command(client, "U0BOB", f"show {override['id']}"))[REJECT]
    assert (
        client.post(
            f"/v1/overrides/{override['id']}/cancel", json=COMMENT, headers=auth("alice", "requester")
        ).status_code
        == 200
    )
    click(client, "U0BOB", reject, slack_side.response_url)
    until_count(slack_side.responses, 1)
    (update,) = slack_side.responses
    assert update["replace_original"] is True and header(update).endswith("· cancelled")
    assert APPROVE not in buttons(update) and "Not rejected" in dumps(update["blocks"])
    assert load(engine, override["id"]).state == "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# The slash command


def test_request_list_show_approve_and_reject_through_the_command(engine: Engine, client: TestClient) -> None:
    created = command(
        client,
        "U0ALICE",
        "request bücher.example fingerprint ticket=MAIL-4711 ticket_url=<https://t.example/MAIL-4711> "
        'duration=PT12H parameters="match=7F:92:30:AA:01:02:03:04:05:06:07:08:09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:'
        '15:16:17:18:19:1A:1B:1C" The recipient\u2019s TLSA is stale since 09:00 &lt;ticket&gt;',
    )
    assert created["response_type"] == "ephemeral", created
    number = int(header(created).split("#")[1].split(" ")[0])
    stored = load(engine, number)
    assert (stored.destination, stored.policy, stored.ticket, stored.duration_seconds) == (
        "xn--bcher-kva.example",
        "fingerprint",
        "MAIL-4711",
        12 * 3600,
    )
    assert stored.ticket_url == "https://t.example/MAIL-4711" and stored.justification.endswith("<ticket>")
    assert (stored.requested_by, stored.requested_via) == ("alice", "slack")
    assert f"*#{number}*" in command(client, "U0BOB", "list")["text"]
    assert "No overrides" in command(client, "U0BOB", "list rejected")["text"]
    assert "own request" in command(client, "U0ALICE", f"approve {number} Looks right to me.")["text"]
    rejected = command(client, "U0BOB", f"reject {number} Use the pinned key only after the recipient confirms.")
    assert header(rejected).endswith("· rejected") and load(engine, number).state == "rejected"
    assert audit_rows(engine, "override.rejected")[0]["via"] == "slack"
    assert "Not requested" in command(client, "U0CAROL", "request a.example encrypt too short")["text"]
    assert "approve 1 COMMENT" in command(client, "U0BOB", "approve 1")["text"]
    assert "Usage" in command(client, "U0NOBODY", "help")["text"]


def test_the_grammar() -> None:
    assert parse("").name == "help"
    assert parse("list").states == ("pending",) and parse("list all").states == ()
    assert parse("show #42").override_id == 42
    approve = parse("approve 42 Checked the diagnosis.")
    assert (approve.name, approve.override_id, approve.comment) == ("approve", 42, "Checked the diagnosis.")
    request = parse('request <http://example.org|example.org> may ticket=T-1 parameters="protocols=>=TLSv1" Why: x')
    assert request.request == {
        "destination": "example.org",
        "policy": "may",
        "ticket": "T-1",
        "parameters": "protocols=>=TLSv1",
        "justification": "Why: x",
    }
    for bad in ("show", "show 4x", "approve 42", "list nonsense", "fly", "request example.org", "request a b ticket=1"):
        with pytest.raises(CommandError):
            parse(bad)


# ---------------------------------------------------------------------------------------------------------------
# The notifier's messages: posted once, updated in place


async def test_the_channel_message_is_posted_once_and_updated_in_place(
    engine: Engine, client: TestClient, make_override: Any, auth: Any, settings: Settings, slack_side: SlackSide
) -> None:
    async with httpx.AsyncClient() as http:
        await deliver(engine, settings, http, "w1")  # the sink starts at the end of the trail
        override = make_override("alice", justification="Stale TLSA since the renewal <!channel> please look")
        await deliver(engine, settings, http, "w1")
        (posted,) = slack_side.api
        assert (posted["method"], posted["auth"]) == ("chat.postMessage", f"Bearer {BOT_TOKEN}")
        message = posted["body"]
        assert message["channel"] == "C0REVIEW" and header(message) == f"TLS override #{override['id']} · pending"
        text = dumps(message["blocks"])
        assert "encrypt · not diagnosed · certificate not checked" in text
        assert "&lt;!channel&gt;" in text and "<!channel>" not in text  # a justification cannot ping anyone
        assert "OPS-1" in text and "P3D once applied" in text
        assert set(buttons(message)) == {APPROVE, REJECT, "tlso_open"}
        assert buttons(message)["tlso_open"]["url"] == f"https://tlso.example.com/v1/overrides/{override['id']}"

        decided = client.post(f"/v1/overrides/{override['id']}/approve", json=COMMENT, headers=auth("bob", "approver"))
        assert decided.status_code == 200
        await deliver(engine, settings, http, "w1")
    updated = slack_side.api[-1]
    assert updated["method"] == "chat.update" and len(slack_side.api) == 2
    assert (updated["body"]["channel"], updated["body"]["ts"]) == ("C0REVIEW", "1700000000.000001")
    assert header(updated["body"]).endswith("· approved") and APPROVE not in buttons(updated["body"])
    assert "`override.approved` by bob" in dumps(updated["body"]["blocks"])


def until_count(items: list[Any], n: int) -> None:
    deadline = time.monotonic() + 5
    while len(items) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} Slack responses, got {len(items)}")
        time.sleep(0.02)


def test_signed_payloads_of_another_shape_are_answered_not_failed(engine: Engine, client: TestClient) -> None:
    before = counts(engine)
    for payload in (
        {"type": "block_actions", "team": {"id": TEAM}, "user": ["U0BOB"], "actions": "approve"},
        {"type": "block_actions", "team": {"id": TEAM}, "user": {"id": "U0BOB"}, "actions": [{"action_id": APPROVE}]},
        {"type": "view_submission", "team": {"id": TEAM}},
    ):
        body = urlencode({"payload": json.dumps(payload)})
        answered = client.post("/slack/interactions", content=body, headers=signed(body))
        assert (answered.status_code, answered.content) == (200, b""), answered.text
    body = urlencode({"payload": "{not json"})
    assert_problem(client.post("/slack/interactions", content=body, headers=signed(body)), 400)
    assert counts(engine) == before
