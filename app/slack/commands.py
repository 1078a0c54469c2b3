"""The `/tlso` slash command's grammar (pure: text in, a command or an error out).

    /tlso help
    /tlso list [STATE …]          pending by default; `all` for every state
    /tlso show ID
    /tlso approve ID COMMENT…
    /tlso reject ID COMMENT…
    /tlso request DESTINATION POLICY [duration=P3D] [ticket=MAIL-4711] [ticket_url=https://…]
                  [target=NAME] [parameters="match=AA:BB:…"] JUSTIFICATION…

An ID may be written `42` or `#42`. Options come right after the policy, each `name=value` (quote a
value with spaces: `parameters="match=AA:BB protocols=>=TLSv1.2"`); everything after them is the
justification. Slack's own markup in the text (`&amp;`, `<https://…|…>`) is undone first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from app.overrides.models import OverrideState

USAGE = (
    "`/tlso list [STATE …]` · `/tlso show ID` · `/tlso approve ID COMMENT` · `/tlso reject ID COMMENT` · "
    "`/tlso request DESTINATION POLICY [duration=P3D] [ticket=T] [ticket_url=URL] [target=NAME] "
    '[parameters="…"] JUSTIFICATION`'
)
OPTIONS = ("duration", "ticket", "ticket_url", "target", "parameters")
_OPTION = re.compile(r'^\s*(\w+)=(?:["“”]([^"“”]*)["“”]|(\S+))')
_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")


class CommandError(ValueError):
    """The text is not a command; the message says what is expected."""


@dataclass(frozen=True)
class Command:
    name: Literal["help", "list", "show", "approve", "reject", "request"]
    override_id: int | None = None
    comment: str | None = None
    states: tuple[OverrideState, ...] = ()
    request: dict[str, Any] = field(default_factory=dict)  # OverrideCreate fields


def unslack(text: str) -> str:
    """Slack's markup back to what was typed: `<https://x|x>` → `https://x`, `&lt;` → `<`."""

    def plain(match: re.Match[str]) -> str:
        target, label = match.group(1), match.group(2)
        if label and not target.startswith(("http://", "https://", "mailto:")):
            return label
        if label and target.split("://", 1)[-1].rstrip("/") == label.rstrip("/"):
            return label  # an auto-linked domain: `<http://example.org|example.org>`
        return target

    return _LINK.sub(plain, text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


def parse(text: str) -> Command:
    text = unslack(text)
    word, _, rest = text.partition(" ")
    word, rest = word.lower(), rest.strip()
    if word in ("", "help"):
        return Command("help")
    if word == "list":
        return Command("list", states=_states(rest.split()))
    if word == "show":
        return Command("show", override_id=_id(rest, alone=True))
    if word in ("approve", "reject"):
        first, _, comment = rest.partition(" ")
        if not comment.strip():
            raise CommandError(f"Say why: `/tlso {word} {first or 'ID'} COMMENT` (every decision carries a comment).")
        return Command(word, override_id=_id(first, alone=True), comment=comment.strip())  # type: ignore[arg-type]
    if word == "request":
        return Command("request", request=_request(rest))
    raise CommandError(f"Unknown command `{word}`. Usage: {USAGE}")


def _id(text: str, *, alone: bool) -> int:
    token = text.strip().removeprefix("#")
    if not token.isascii() or not token.isdigit() or (alone and " " in text.strip()) or not 0 < int(token) < 2**31:
        raise CommandError(f"`{text.strip() or '(nothing)'}` is not an override id (e.g. `42`).")
    return int(token)


def _states(words: list[str]) -> tuple[OverrideState, ...]:
    if not words:
        return (OverrideState.pending,)
    if [w.lower() for w in words] == ["all"]:
        return ()
    try:
        return tuple(OverrideState(w.lower()) for w in words)
    except ValueError:
        known = ", ".join(s.value for s in OverrideState)
        raise CommandError(f"Unknown state in `{' '.join(words)}`; known: {known}, or `all`.") from None


def _request(text: str) -> dict[str, Any]:
    parts = text.split(None, 2)
    if len(parts) < 2:
        raise CommandError(f"Usage: {USAGE}")
    fields: dict[str, Any] = {"destination": parts[0], "policy": parts[1].lower()}
    rest = parts[2] if len(parts) == 3 else ""
    while (match := _OPTION.match(rest)) and match.group(1).lower() in OPTIONS:
        name = match.group(1).lower()
        if name in fields:
            raise CommandError(f"`{name}=` is given twice.")
        fields[name] = match.group(2) if match.group(2) is not None else match.group(3)
        rest = rest[match.end() :]
    if not rest.strip():
        raise CommandError("Add a justification after the options: why does mail need this override?")
    fields["justification"] = rest.strip()
    return fields
