"""Webhook sinks as configured in `TLSO_NOTIFY_WEBHOOKS`, checked: which events each wants, how it is
reached, and the Standard Webhooks secrets it is signed with.

    {"tickets": {"url": "https://jira.example.com/hook", "secret_file": "/run/secrets/tickets",
                 "requested_via": "ticketing-client"},
     "slack":   {"format": "slack", "channel": "C0123ABCD"}}

Secrets are `whsec_` + base64 of 24 to 64 random bytes (the Standard Webhooks form). A sink may hold
several (a list in `secret`, or several words in the `secret_file`): every one signs each delivery,
so a receiver can rotate by adding the new secret first and dropping the old one later. Files are read
on every delivery pass, so a rotated file takes effect without a restart.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.core.config import Settings

# Signed checkpoints of the trail go to every sink that keeps the default: each receiver holds a copy
# of the anchor that someone who rewrites the database cannot reach.
DEFAULT_EVENTS = ("override.*", "recipient.*", "audit.checkpoint")
SECRET_PREFIX = "whsec_"  # noqa: S105  (the prefix of every secret, not a secret)
KNOWN_KEYS = frozenset({"url", "secret", "secret_file", "format", "events", "requested_via", "channel"})


class SinkConfigError(ValueError):
    """A sink's configuration that cannot work; the message names the sink and the key."""


@dataclass(frozen=True)
class Sink:
    name: str
    format: Literal["json", "slack"]
    events: tuple[str, ...]
    url: str | None = None  # json: the receiver; slack: an incoming webhook (posts only)
    secrets: tuple[str, ...] = ()
    requested_via: str | None = None  # only events of overrides that integration submitted
    channel: str | None = None  # slack through the Web API (chat.postMessage, then chat.update in place)

    def wants(self, action: str, override_via: str | None, has_override: bool) -> bool:
        """Whether this sink takes an event: its type matches `events`, and a scoped sink takes only the
        events of overrides its integration submitted (no checkpoints, no other overrides)."""
        if self.requested_via is not None and (not has_override or override_via != self.requested_via):
            return False
        return any(fnmatch.fnmatchcase(action, pattern) for pattern in self.events)


def sinks_from(settings: Settings) -> list[Sink]:
    """Every configured sink, checked; a SinkConfigError says which one is wrong and why."""
    return [_sink(name, spec, settings) for name, spec in settings.notify_webhooks.items()]


def _sink(name: str, spec: Any, settings: Settings) -> Sink:
    def fail(message: str) -> SinkConfigError:
        return SinkConfigError(f"TLSO_NOTIFY_WEBHOOKS[{name!r}]: {message}")

    if not isinstance(spec, dict):
        raise fail("must be an object")
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}")
    if len(name) > 100:
        raise fail("the name must be at most 100 characters")
    kind = spec.get("format", "json")
    if kind not in ("json", "slack"):
        raise fail("`format` must be `json` or `slack`")
    events = spec.get("events") or list(DEFAULT_EVENTS)
    events = [events] if isinstance(events, str) else events
    if not isinstance(events, list) or not all(isinstance(e, str) and e for e in events):
        raise fail("`events` must be a list of patterns such as `override.*`")
    url, channel = spec.get("url"), spec.get("channel")
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise fail("`url` must be an http(s) URL")
    if kind == "json" and not url:
        raise fail("`url` is required")
    if kind == "slack" and bool(url) == bool(channel):
        raise fail("a slack sink needs exactly one of `url` (an incoming webhook) or `channel` (with a bot token)")
    if channel and not (settings.slack_bot_token or settings.slack_bot_token_file):
        raise fail("`channel` needs TLSO_SLACK_BOT_TOKEN(_FILE) (chat.postMessage and chat.update)")
    secrets = _secrets(spec, fail)
    if kind == "json" and not secrets:
        raise fail("`secret` or `secret_file` is required: receivers verify every delivery (Standard Webhooks)")
    via = spec.get("requested_via")
    if via is not None and (not isinstance(via, str) or not via):
        raise fail("`requested_via` must be an integration's client id")
    return Sink(
        name=name,
        format=kind,
        events=tuple(events),
        url=url,
        secrets=secrets,
        requested_via=via,
        channel=channel if isinstance(channel, str) else None,
    )


def _secrets(spec: dict[str, Any], fail: Any) -> tuple[str, ...]:
    given = spec.get("secret")
    found: list[str] = [given] if isinstance(given, str) else list(given or [])
    if spec.get("secret_file"):
        try:
            found += Path(str(spec["secret_file"])).read_text(encoding="utf-8").split()
        except OSError as exc:
            raise fail(f"`secret_file` cannot be read: {exc}") from exc
    for secret in found:
        problem = secret_problem(secret)
        if problem:
            raise fail(problem)
    return tuple(found)


def secret_problem(secret: Any) -> str | None:
    """Why `secret` is not a usable Standard Webhooks secret (None: it is)."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        return f"secrets must start with `{SECRET_PREFIX}` (Standard Webhooks); see the README for making one"
    try:
        raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"a secret is not `{SECRET_PREFIX}` + base64"
    if not 24 <= len(raw) <= 64:
        return f"a secret must hold 24 to 64 random bytes (this one holds {len(raw)})"
    return None
