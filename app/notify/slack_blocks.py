"""Block Kit messages about overrides (pure: snapshots in, Slack JSON out).

Every piece of text a person typed (justification, names, ticket) is escaped, so that a justification
cannot ping `<!channel>` or disguise a link; Slack's size limits are respected by truncation.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter

from app.core.config import Settings
from app.notify.events import OverrideSnapshot, WebhookEvent

APPROVE = "tlso_approve"
REJECT = "tlso_reject"
_DURATION = TypeAdapter(timedelta)


def escape(text: str) -> str:
    """Slack mrkdwn control characters as entities (Slack's documented escaping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _link(url: str, label: str) -> str:
    safe_url = url.replace("|", "%7C").replace("<", "%3C").replace(">", "%3E").replace(" ", "%20")
    return f"<{safe_url}|{escape(label)}>"


def iso_duration(value: timedelta) -> str:
    return str(_DURATION.dump_python(value, mode="json"))


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def button_value(snapshot: OverrideSnapshot) -> str:
    """What a button carries: the override and the version the reviewer saw (sent back as If-Match)."""
    return json.dumps({"override": snapshot.id, "version": snapshot.version}, separators=(",", ":"))


def override_blocks(snapshot: OverrideSnapshot, footer: str | None = None) -> list[dict[str, Any]]:
    """The override in a message: what is asked, the summary line, who, ticket, expiry; buttons while pending."""
    s = snapshot
    approvals = f"{len(s.approvals)} of {s.approvals_required}"
    if s.pending_extension is not None:
        approvals += f" · extension by {iso_duration(s.pending_extension.duration)} asked"
    requester = escape(s.requested_by.name)
    if s.requested_by.name != s.requested_by.id:
        requester += f" ({escape(s.requested_by.id)})"
    if s.requested_via:
        requester += f" via {escape(s.requested_via)}"
    ticket = "—"
    if s.ticket and s.ticket_url:
        ticket = _link(s.ticket_url, s.ticket)
    elif s.ticket_url:
        ticket = _link(s.ticket_url, s.ticket_url)
    elif s.ticket:
        ticket = escape(s.ticket)
    if s.expires_at is not None:
        expiry = f"expires {_when(s.expires_at)}"
    else:
        expiry = f"{iso_duration(s.duration)} once applied"
    parameters = f" `{escape(s.parameters)}`" if s.parameters else ""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _cut(f"TLS override #{s.id} · {s.state.value}", 150)},
        },
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _cut(
                    f"*{escape(s.destination)}* on `{escape(s.target)}`: policy `{s.policy}`{parameters}\n"
                    f"{escape(s.summary.line)}",
                    3000,
                ),
            },
        },
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _cut(f"*Requested by*\n{requester}", 2000)},
                {"type": "mrkdwn", "text": f"*Approvals*\n{approvals}"},
                {"type": "mrkdwn", "text": _cut(f"*Ticket*\n{ticket}", 2000)},
                {"type": "mrkdwn", "text": f"*Expiry*\n{expiry}"},
            ],
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _cut(f"*Justification*\n>{escape(s.justification)}", 3000)},
        },
    ]
    if s.queue is not None and s.queue.line:
        stuck = f"*Mail queue* ({_when(s.queue.checked_at)})\n{escape(s.queue.line)}"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(stuck, 3000)}})
    refused = [f for f in s.findings if f.severity != "info"]
    if refused:
        lines = "\n".join(f"• {escape(f.message)}" for f in refused[:5])
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"*Findings*\n{lines}", 3000)}})
    elements: list[dict[str, Any]] = []
    if s.state.value == "pending" or s.pending_extension is not None:
        what = f"{s.destination} ({s.policy})"
        elements += [
            _button("Approve", APPROVE, "primary", button_value(s), f"Approve the override for {what}?"),
            _button("Reject", REJECT, "danger", button_value(s), f"Reject the override for {what}?"),
        ]
    if s.links.self_.startswith(("http://", "https://")):
        elements.append({"type": "button", "action_id": "tlso_open", "text": _plain("Open"), "url": s.links.self_})
    if elements:
        blocks.append({"type": "actions", "block_id": f"tlso_override_{s.id}", "elements": elements})
    if footer:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(footer, 3000)}]})
    return blocks


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text}


def _button(label: str, action_id: str, style: str, value: str, question: str) -> dict[str, Any]:
    return {
        "type": "button",
        "action_id": action_id,
        "text": _plain(label),
        "style": style,
        "value": value,
        "confirm": {
            "title": _plain(f"{label}?"),
            "text": _plain(_cut(question, 300)),
            "confirm": _plain(label),
            "deny": _plain("Cancel"),
        },
    }


def override_message(snapshot: OverrideSnapshot, footer: str | None = None) -> dict[str, Any]:
    """A whole message (fallback text for notifications and screen readers, plus the blocks)."""
    text = f"TLS override #{snapshot.id} for {snapshot.destination}: {snapshot.state.value} · {snapshot.summary.line}"
    return {"text": escape(_cut(text, 3000)), "blocks": override_blocks(snapshot, footer)}


def notification_message(event: WebhookEvent, settings: Settings) -> dict[str, Any]:
    """What a `format: slack` sink posts for an event."""
    data = event.data
    by = escape(data.actor) + (f" via {escape(data.via)}" if data.via else "")
    footer = f"`{event.type}` by {by} · audit seq {data.audit.seq}"
    if data.comment and event.type != "override.created":
        footer += f" · “{escape(_cut(data.comment, 500))}”"
    if data.override is not None:
        return override_message(data.override, footer)
    if event.type == "audit.checkpoint":
        signed = json.dumps(data.checkpoint, sort_keys=True)
        text = f"tlsoverride: signed audit checkpoint of seq {(data.checkpoint or {}).get('seq')}\n```{signed}```"
        return {"text": text}
    return {"text": f"tlsoverride: {footer}"}
