"""The two Slack Web API methods the notifier uses (chat.postMessage, chat.update), and posts to a
`response_url`. Slack answers HTTP 200 with `{"ok": false, "error": …}` for most refusals."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.core.config import Settings, read_secret

log = logging.getLogger("app.slack")

# Slack's own errors that mean "try again later", not "this message is wrong".
UNAVAILABLE_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


@dataclass
class Answer:
    ok: bool
    status: int | None = None
    unavailable: bool = False
    error_code: str | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        return None if self.ok else f"Slack: {self.error_code or f'HTTP {self.status}'}"


def bot_token(settings: Settings) -> str | None:
    return read_secret(settings.slack_bot_token, settings.slack_bot_token_file)


async def call(http: httpx.AsyncClient, settings: Settings, method: str, body: dict[str, Any]) -> Answer:
    """One Web API call with the bot token (never logged)."""
    url = settings.slack_api_url.rstrip("/") + "/" + method
    response = await http.post(url, json=body, headers={"Authorization": f"Bearer {bot_token(settings)}"})
    if response.status_code == 429 or response.status_code >= 500:
        return Answer(
            ok=False, status=response.status_code, unavailable=True, error_code=f"HTTP {response.status_code}"
        )
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if response.status_code == 200 and answer.get("ok") is True:
        return Answer(ok=True, status=200, body=answer)
    code = str(answer.get("error") or f"HTTP {response.status_code}")
    return Answer(
        ok=False, status=response.status_code, unavailable=code in UNAVAILABLE_ERRORS, error_code=code, body=answer
    )


async def respond(http: httpx.AsyncClient, response_url: str, message: dict[str, Any]) -> None:
    """Post to an interaction's `response_url` (best effort: the state is committed already, and a
    channel sink's chat.update shows it too)."""
    try:
        response = await http.post(response_url, json=message)
        if response.status_code >= 300:
            log.warning("Slack response_url answered HTTP %s: %s", response.status_code, response.text[:200])
    except httpx.HTTPError as exc:
        log.warning("Slack response_url failed: %s", exc)
