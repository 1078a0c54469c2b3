"""Slack requests: proven to come from Slack, taken once, acted on as the mapped person `via` Slack.

Verification is slack_sdk's `SignatureVerifier` (v0 HMAC-SHA256 of `v0:timestamp:body` with the app's
signing secret, timestamps within 5 minutes). A verified request is remembered by its signature in
`slack_request_seen` (committed before anything is done), so a replay within the window is refused by
whichever API replica receives it; older ones fail the timestamp check.

A Slack user is a person only through `TLSO_SLACK_USERS` (Slack user id → person), never through the
display name Slack sends. The person acts through the override service like any caller, with
`via = "slack"`: no self-approval (by person key), one vote per person, and Slack counts as one
integration towards `TLSO_INTEGRATION_APPROVALS_PER_ROUND`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from slack_sdk.signature import Clock, SignatureVerifier
from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.audit.refusals import record_refusal
from app.core.auth import Principal
from app.core.config import ROLES, Role, Settings, read_secret
from app.core.db import reading, transaction, utcnow
from app.core.errors import AppError, NotFound, SlackRequestRefused
from app.core.person import is_reserved
from app.notify.events import OverrideSnapshot, snapshot_at
from app.notify.models import SlackRequestSeen
from app.notify.slack_blocks import APPROVE, REJECT, escape, override_message
from app.overrides import service
from app.overrides.decisions import approve, reject
from app.overrides.lifecycle import load
from app.overrides.models import Override, Vote
from app.overrides.permissions import ActionContext, can_see
from app.overrides.summary import summarize
from app.slack.commands import Command

VIA = "slack"
DONE = {"approve": "approved", "reject": "rejected"}
REPLAY_WINDOW = timedelta(minutes=5)  # slack_sdk refuses older timestamps; Slack's documented window
SLACK_ROLES: frozenset[Role] = frozenset({"requester", "approver"})
T = TypeVar("T")


@dataclass(frozen=True)
class SlackUser:
    person: str
    roles: frozenset[Role]


def slack_users(settings: Settings) -> dict[str, SlackUser]:
    """TLSO_SLACK_USERS, checked: `{"U0123": "alice"}` (the integration's delegated roles) or
    `{"U0123": {"person": "alice", "roles": ["approver"]}}`."""
    users: dict[str, SlackUser] = {}
    default = frozenset(r for r in settings.integration_delegated_roles if r in SLACK_ROLES)
    for user_id, spec in settings.slack_users.items():
        person, roles = (spec, default) if isinstance(spec, str) else (None, default)
        if isinstance(spec, dict):
            person = spec.get("person")
            wanted = spec.get("roles", sorted(default))
            if not isinstance(wanted, list) or not set(wanted) <= set(ROLES):
                raise ValueError(f"TLSO_SLACK_USERS[{user_id!r}]: roles must be a list of {', '.join(ROLES)}")
            if not set(wanted) <= SLACK_ROLES:
                raise ValueError(f"TLSO_SLACK_USERS[{user_id!r}]: Slack users may only be requester and approver")
            roles = frozenset(wanted)
        if not isinstance(person, str) or not person.strip() or len(person) > 200 or is_reserved(person):
            raise ValueError(f"TLSO_SLACK_USERS[{user_id!r}] must name a person (1 to 200 characters, not 'system')")
        users[user_id] = SlackUser(person=person.strip(), roles=roles)
    return users


def principal_for(settings: Settings, user_id: str) -> Principal | None:
    user = slack_users(settings).get(user_id)
    if user is None:
        return None
    return Principal(actor=user.person, name=user.person, roles=user.roles, via=VIA)


# ---------------------------------------------------------------------------------------------------------------
# Is it Slack, and the first time?


class _Clock(Clock):
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def verify(engine: Engine, settings: Settings, body: bytes, headers: dict[str, str], now: float | None = None) -> None:
    """Slack's signature over this body, fresh, and never seen before; else SlackRequestRefused.
    (`now`: the clock for the freshness check, the real one unless a test replays Slack's documented example.)"""
    timestamp, signature = headers.get("x-slack-request-timestamp"), headers.get("x-slack-signature")
    if not timestamp or not signature:
        raise SlackRequestRefused("X-Slack-Request-Timestamp and X-Slack-Signature are required.")
    secret = read_secret(settings.slack_signing_secret, settings.slack_signing_secret_file)
    if not secret:
        raise NotFound("Slack is not configured here (TLSO_SLACK_SIGNING_SECRET).")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise SlackRequestRefused("X-Slack-Request-Timestamp is not a Unix time.")
    verifier = SignatureVerifier(secret) if now is None else SignatureVerifier(secret, clock=_Clock(now))
    if not verifier.is_valid(body=body, timestamp=timestamp, signature=signature):
        raise SlackRequestRefused(
            "The request's X-Slack-Signature does not match its body and timestamp, or the timestamp is more "
            "than 5 minutes away."
        )
    remember(engine, signature)


def remember(engine: Engine, signature: str) -> None:
    """Record the signature (committed at once); a second time within the window is a replay."""
    digest = hashlib.sha256(signature.encode()).hexdigest()
    now = utcnow()
    try:
        with transaction(engine) as session:
            session.execute(delete(SlackRequestSeen).where(col(SlackRequestSeen.seen_at) < now - 2 * REPLAY_WINDOW))
            session.add(SlackRequestSeen(digest=digest, seen_at=now))
    except IntegrityError:
        raise SlackRequestRefused("This request was received before: replays are refused.") from None


def check_team(settings: Settings, team_id: str | None) -> None:
    if settings.slack_team_id and team_id != settings.slack_team_id:
        raise SlackRequestRefused("The request comes from another Slack workspace.")


# ---------------------------------------------------------------------------------------------------------------
# Acting


def field(payload: dict[str, Any], *path: str) -> str:
    """A string inside Slack's payload, or "" (a payload of another shape answers, never fails)."""
    value: Any = payload
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def ephemeral(text: str) -> dict[str, Any]:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}


def unmapped(
    engine: Engine, settings: Settings, user_id: str, attempted: str, override_id: int | None
) -> dict[str, Any]:
    """An unknown Slack user asked for something: on record as a refusal, and told how to get mapped."""
    record_refusal(
        engine,
        settings,
        actor=f"slack:{user_id}",
        via=VIA,
        override_id=override_id,
        after={"attempted": attempted, "slack_user": user_id},
        comment=f"Slack user {user_id} is not mapped to a person (TLSO_SLACK_USERS)",
    )
    return ephemeral(
        f"Your Slack user `{escape(user_id)}` is not linked to a tlsoverride person. Ask an admin to add it to "
        "`TLSO_SLACK_USERS`."
    )


def snapshot(session: Session, settings: Settings, override: Override) -> OverrideSnapshot:
    """The override as it is now (after its transaction committed: its audit rows are written then)."""
    votes = session.exec(select(Vote).where(Vote.override_id == override.id)).all()
    trail = session.exec(select(AuditEvent).where(AuditEvent.override_id == override.id)).all()
    return snapshot_at(override, votes, trail, 2**62, settings)


def _context(
    engine: Engine, settings: Settings, principal: Principal, session: Session, if_match: str | None = None
) -> ActionContext:
    return ActionContext(principal=principal, settings=settings, engine=engine, if_match=if_match, session=session)


def act(
    engine: Engine,
    settings: Settings,
    principal: Principal,
    work: Callable[[Session, ActionContext], Override],
    if_match: str | None = None,
) -> tuple[OverrideSnapshot | None, str | None]:
    """Run one service call in its own transaction; the override afterwards, or why it was refused."""
    try:
        with transaction(engine) as session:
            override_id = work(session, _context(engine, settings, principal, session, if_match)).id or 0
    except AppError as exc:
        return None, exc.detail or exc.title
    with reading(engine) as session:
        return snapshot(session, settings, load(session, override_id)), None


def decide(
    engine: Engine,
    settings: Settings,
    principal: Principal,
    decision: str,
    override_id: int,
    comment: str,
    version: int | None = None,
) -> tuple[OverrideSnapshot | None, str | None]:
    """Approve or reject as `principal`, at `version` when a button carried one (If-Match)."""
    call = approve if decision == "approve" else reject
    return act(
        engine,
        settings,
        principal,
        lambda session, ctx: call(session, ctx, override_id, comment),
        if_match=None if version is None else f'"{version}"',
    )


def current(engine: Engine, settings: Settings, principal: Principal, override_id: int) -> OverrideSnapshot | None:
    with reading(engine) as session:
        try:
            override = load(session, override_id)
        except NotFound:
            return None
        return snapshot(session, settings, override) if can_see(principal, override) else None


def button_click(engine: Engine, settings: Settings, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A block action: (the message for response_url, whether it replaces the clicked message)."""
    import json

    user_id = str(field(payload, "user", "id"))
    actions = payload.get("actions")
    action = actions[0] if isinstance(actions, list) and actions and isinstance(actions[0], dict) else {}
    action_id = action.get("action_id")
    if action_id not in (APPROVE, REJECT):
        return ephemeral("Nothing to do for this button."), False
    try:
        value = json.loads(action.get("value") or "")
        override_id, version = int(value["override"]), int(value["version"])
    except (ValueError, KeyError, TypeError):
        return ephemeral("This button carries no override; use `/tlso show ID`."), False
    decision = "approve" if action_id == APPROVE else "reject"
    principal = principal_for(settings, user_id)
    if principal is None:
        return unmapped(engine, settings, user_id, decision, override_id), False
    channel = field(payload, "channel", "name")
    where = f" in #{channel}" if channel else ""
    comment = f"{DONE[decision].capitalize()} with the Slack button{where}."
    after, refused = decide(engine, settings, principal, decision, override_id, comment, version)
    if refused is not None:
        now = current(engine, settings, principal, override_id)
        if now is not None and now.version != version:
            # The message was out of date: show what there is now, and say why nothing happened.
            return {"replace_original": True, **override_message(now, f"Not {DONE[decision]}: {escape(refused)}")}, True
        return ephemeral(f"Not {DONE[decision]}: {escape(refused)}"), False
    assert after is not None
    footer = f"{DONE[decision].capitalize()} by {escape(principal.actor)} via Slack"
    return {"replace_original": True, **override_message(after, footer)}, True


def command_reply(engine: Engine, settings: Settings, principal: Principal, command: Command) -> dict[str, Any]:
    """Everything but `request` (which diagnoses first, see the router)."""
    if command.name == "list":
        return ephemeral_blocks(list_text(engine, principal, command))
    assert command.override_id is not None
    if command.name == "show":
        found = current(engine, settings, principal, command.override_id)
        if found is None:
            return ephemeral(f"Override {command.override_id} does not exist.")
        return {"response_type": "ephemeral", **override_message(found)}
    after, refused = decide(
        engine, settings, principal, command.name, command.override_id, command.comment or "", version=None
    )
    if refused is not None:
        return ephemeral(f"Not {DONE[command.name]}: {escape(refused)}")
    assert after is not None
    return {
        "response_type": "ephemeral",
        **override_message(after, f"{DONE[command.name].capitalize()} by you via Slack"),
    }


def ephemeral_blocks(text: str) -> dict[str, Any]:
    return {
        "response_type": "ephemeral",
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
    }


def list_text(engine: Engine, principal: Principal, command: Command, limit: int = 15) -> str:
    with reading(engine) as session:
        rows, more = service.list_overrides(
            session, principal, service.OverrideFilter(state=list(command.states) or None), None, limit
        )
        lines = []
        for o in rows:
            summary = summarize(o.policy, o.parameters, o.diagnosis).line
            who = escape(o.requested_by_name)
            lines.append(f"*#{o.id}* {escape(o.destination)} · {o.state.value} · {escape(summary)} · {who}")
    what = ", ".join(s.value for s in command.states) or "any state"
    if not lines:
        return f"No overrides ({what})."
    tail = (
        f"\n…and more: `/tlso list {' '.join(s.value for s in command.states)}` shows the newest {limit}."
        if more
        else ""
    )
    return (f"Overrides ({what}), newest first:\n" + "\n".join(lines) + tail)[:3000]
