"""Reading mailcow's answers about the mail queue (mailcow-api.md §12); the client's `get_mailq` and
`deliver` send the calls.

Only two queue calls exist in this project: the list and "deliver now" for named messages. mailcow also
has `flush` (the whole queue), `super_delete` (deletes every queued message) and `POST /delete/mailq`;
no code here can send them, and the stand-in fails any test that does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Final

from app.mailcow.errors import MailcowEmptyResponse, MailcowProtocolError
from app.mailcow.queue import MailqShapeError, QueueMessage, parse_mailq

MAILQ_PATH: Final = "/api/v1/get/mailq/all"
EDIT_MAILQ_PATH: Final = "/api/v1/edit/mailq"
# dockerapi runs one `postqueue -i` per id inside the postfix container: keep each call short enough
# for the client's timeout, whatever the number of messages for a domain.
DELIVER_BATCH: Final = 50
DELIVERED: Final = "queue_command_success"


def batches(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError("batch size must be at least 1")
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def deliver_body(ids: list[str]) -> dict[str, Any]:
    """The edit body asking Postfix to deliver `ids` now; ids go as strings (a number is an error)."""
    return {"items": ids, "attr": {"action": "deliver"}}


def read_mailq(text: str) -> list[QueueMessage]:
    """The queue in a `get/mailq/all` answer's body. Errors never quote the body: it holds addresses."""
    if text.strip() == "":
        raise MailcowEmptyResponse("mailq: HTTP 200 with an empty body (no API key reached mailcow?)", status=200)
    try:
        payload = json.loads(text)
    except ValueError:
        raise MailcowProtocolError(f"mailq: the answer is not JSON ({len(text)} characters)") from None
    try:
        return parse_mailq(payload)
    except MailqShapeError as exc:
        raise MailcowProtocolError(str(exc)) from None


def check_delivered(entries: list[dict[str, Any]]) -> None:
    """`deliver`'s answer (danger entries already raised): mailcow confirms with `queue_command_success`,
    which says nothing about delivery (it is the same for a vanished id) — read the queue to know.
    "Task completed" means mailcow did nothing (no items, or an action it did not know)."""
    if any(entry.get("type") == "success" and entry.get("msg") == DELIVERED for entry in entries):
        return
    raise MailcowProtocolError(f"deliver: mailcow did not confirm the queue ids (answered {_msgs(entries)})")


def _msgs(entries: list[dict[str, Any]]) -> str:
    return ", ".join(repr(entry.get("msg")) for entry in entries) or "nothing"
