"""TEST DOUBLE of mailcow's mail queue API (mailcow-api.md §12), wired into devtools/mailcow_standin.py.
This is not Postfix.

* `GET /api/v1/get/mailq/all`: a JSON array of `postqueue -j` objects with mailcow's recipient rewrite
  (`"rcpt@example.org (delay reason)"`, or the bare address); `[]` when empty; without `/all` an empty
  200; at most the first 10,000 messages.
* `POST /api/v1/edit/mailq` `{"items": [...], "attr": {"action": "deliver"}}` (a read-only key gets the
  403 the policy map's edit gets): ids that are not hex are dropped silently, the answer still lists
  them; success for vanished ids; `{"type":"success","msg":"Task completed"}` for empty items or an
  unknown action; a JSON number among the ids gives dockerapi's `danger` and does nothing.
  `deliver` delivers a recipient only when the CURRENT policy row for its domain (active, policy among
  the recipient's `deliverable_under`) lets Postfix through; otherwise it stays deferred with its reason.
  A message leaves the queue when no recipient is left. `hold`/`unhold` move it between queues.
* FORBIDDEN (recorded in `StandinQueue.forbidden`, which tests assert empty at teardown): `flush`,
  `super_delete` (it deletes every message, as mailcow does) and `POST /api/v1/delete/mailq`.
* `dockerapi = "down"` answers mailcow's HTML 500 to both calls; `"no_postfix"` lists `[]` and answers
  edits with `danger` `"unknown"`.

Control API (not mailcow's): `GET /__standin__/queue` (what Postfix holds, addresses included),
`POST /__standin__/queue` (`fill`'s arguments as JSON), `DELETE /__standin__/queue` (empty it and
forget the forbidden calls).
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAILQ_CAP = 10_000
# mailcow's default policy for a domain without a row is dane (Postfix `smtp_tls_security_level`): mail
# stuck on a DANE failure goes through once a row with one of these policies is active.
DEFAULT_DELIVERABLE = frozenset({"none", "may", "encrypt"})
FORBIDDEN_ACTIONS = frozenset({"flush", "super_delete"})
DOCKERAPI_DOWN_HTML = (
    "<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1>"
    "<p>Connection to dockerapi container failed: HTTPConnectionPool(host='dockerapi', port=443)</p></body></html>"
)
_HEX = re.compile(r"[0-9a-fA-F]+")

# (active, policy) of the current row for a domain, or None without one
PolicyLookup = Callable[[str], tuple[int, str] | None]


@dataclass
class QueuedRecipient:
    address: str
    delay_reason: str | None
    deliverable_under: frozenset[str] = DEFAULT_DELIVERABLE

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def rewritten(self) -> str:
        """mailcow's rewrite of Postfix's recipient object."""
        return self.address if not self.delay_reason else f"{self.address} ({self.delay_reason})"


@dataclass
class QueuedMessage:
    queue_id: str
    queue_name: str
    arrival_time: int
    sender: str
    recipients: list[QueuedRecipient]
    message_size: int = 2048

    def as_postqueue(self) -> dict[str, Any]:
        return {
            "queue_name": self.queue_name,
            "queue_id": self.queue_id,
            "arrival_time": self.arrival_time,
            "message_size": self.message_size,
            "forced_expire": False,
            "sender": self.sender,
            "recipients": [r.rewritten() for r in self.recipients],
        }


@dataclass
class QueueCommand:
    """One edit/delete the queue received (for assertions)."""

    action: str
    items: list[Any]
    forbidden: bool = False


@dataclass
class QueueAnswer:
    status: int
    body: Any  # JSON-able, or a str for the HTML page
    content_type: str = "application/json"


@dataclass
class StandinQueue:
    """Postfix's queue as mailcow's API shows it; `policy_for` reads the stand-in's policy table."""

    policy_for: PolicyLookup
    now: Callable[[], datetime]
    messages: dict[str, QueuedMessage] = field(default_factory=dict)
    commands: list[QueueCommand] = field(default_factory=list)
    forbidden: list[QueueCommand] = field(default_factory=list)
    delivered: list[tuple[str, str]] = field(default_factory=list)  # (queue id, recipient domain)
    dockerapi: Literal["up", "down", "no_postfix"] = "up"
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(0x4B1C2D3E00))
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # ---- what tests do ------------------------------------------------------------------------
    def fill(
        self,
        domain: str,
        messages: int = 1,
        recipients_per_message: int = 1,
        reason: str | None = "Server certificate not verified",
        arrival_time: datetime | None = None,
        deliverable_under: Iterable[str] = DEFAULT_DELIVERABLE,
        *,
        queue_name: str = "deferred",
        sender: str = "alice.sender@origin.example",
        local_part: str = "rcpt",
        distinct_recipients: int | None = None,
    ) -> list[str]:
        """Queue `messages` messages to `recipients_per_message` recipients at `domain` each; their ids. With
        `distinct_recipients`, the messages go to that many addresses in turn (several messages each)."""
        arrival = arrival_time or self.now() - timedelta(hours=1)
        allowed = frozenset(deliverable_under)
        ids = []
        with self._lock:
            for n in range(messages):
                queue_id = f"{next(self._ids):X}"
                numbers = [n * recipients_per_message + r for r in range(recipients_per_message)]
                if distinct_recipients:
                    numbers = [number % distinct_recipients for number in numbers]
                recipients = [QueuedRecipient(f"{local_part}{number}@{domain}", reason, allowed) for number in numbers]
                self.messages[queue_id] = QueuedMessage(
                    queue_id, queue_name, int(arrival.timestamp()), sender, recipients
                )
                ids.append(queue_id)
        return ids

    def add_message(self, message: QueuedMessage) -> None:
        with self._lock:
            self.messages[message.queue_id] = message

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.commands.clear()
            self.forbidden.clear()
            self.delivered.clear()
            self.dockerapi = "up"

    def deferred(self, domain: str | None = None) -> list[QueuedMessage]:
        """Messages in the deferred queue (with a recipient at `domain`, if given)."""
        with self._lock:
            return [
                m
                for m in self.messages.values()
                if m.queue_name == "deferred"
                and (domain is None or any(r.domain == domain.lower() for r in m.recipients))
            ]

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.as_postqueue() for m in self.messages.values()]

    # ---- the API ------------------------------------------------------------------------------
    def get(self, obj: str | None) -> QueueAnswer:
        if self.dockerapi == "down":
            return QueueAnswer(500, DOCKERAPI_DOWN_HTML, "text/html; charset=UTF-8")
        if obj != "all":
            return QueueAnswer(200, "", "text/html; charset=UTF-8")
        if self.dockerapi == "no_postfix":
            return QueueAnswer(200, [])
        return QueueAnswer(200, self.listing()[:MAILQ_CAP])

    def edit(self, items: Any, attr: Any) -> QueueAnswer:
        """`mailq('edit', ['qid' => items] + attr)` and dockerapi's answer."""
        action = attr.get("action") if isinstance(attr, dict) else None
        qids = items if isinstance(items, list) else ([] if items in (None, "") else [items])
        command = QueueCommand(str(action), list(qids), forbidden=action in FORBIDDEN_ACTIONS)
        with self._lock:
            self.commands.append(command)
            if command.forbidden:
                self.forbidden.append(command)
        if action not in ("deliver", "hold", "unhold", "delete", "flush", "super_delete"):
            return QueueAnswer(200, {"type": "success", "msg": "Task completed"})
        if action not in ("flush", "super_delete") and not qids:
            return QueueAnswer(200, {"type": "success", "msg": "Task completed"})
        if self.dockerapi == "down":
            return QueueAnswer(500, DOCKERAPI_DOWN_HTML, "text/html; charset=UTF-8")
        log = ["process_mailq_output", "edit", {"qid": qids, "action": action}]
        if self.dockerapi == "no_postfix":
            return QueueAnswer(200, [{"type": "danger", "log": log, "msg": "unknown"}])
        if action in ("flush", "super_delete"):
            self._everything(action)
        else:
            bad = next((q for q in qids if not isinstance(q, str)), None)
            if bad is not None:
                # dockerapi's re.match over the ids raises before anything runs
                msg = f"Error: expected string or bytes-like object, got '{_py_type(bad)}'"
                return QueueAnswer(200, [{"type": "danger", "log": log, "msg": msg}])
            # dropped silently unless hex; vanished and unknown ids change nothing
            self._apply(action, [q for q in qids if _HEX.fullmatch(q)])
        return QueueAnswer(200, [{"type": "success", "log": log, "msg": "queue_command_success"}])

    def delete(self, items: Any) -> QueueAnswer:
        """`POST /api/v1/delete/mailq`: FORBIDDEN for tlsoverride; deletes like mailcow does."""
        qids = items if isinstance(items, list) else [items]
        command = QueueCommand("delete", list(qids), forbidden=True)
        with self._lock:
            self.commands.append(command)
            self.forbidden.append(command)
            for qid in qids:
                if isinstance(qid, str):
                    self.messages.pop(qid, None)
        log = ["process_mailq_output", "delete", {"qid": qids}]
        return QueueAnswer(200, [{"type": "success", "log": log, "msg": "queue_command_success"}])

    # ---- Postfix ------------------------------------------------------------------------------
    def _apply(self, action: str, qids: list[str]) -> None:
        with self._lock:
            for qid in qids:
                message = self.messages.get(qid)
                if message is None:
                    continue
                if action == "deliver":
                    self._try_delivery(message)
                elif action == "hold":
                    message.queue_name = "hold"
                elif action == "unhold" and message.queue_name == "hold":
                    message.queue_name = "deferred"
                elif action == "delete":
                    self.messages.pop(qid, None)

    def _everything(self, action: str) -> None:
        with self._lock:
            if action == "super_delete":
                self.messages.clear()
                return
            for message in list(self.messages.values()):
                if message.queue_name == "deferred":
                    self._try_delivery(message)

    def _try_delivery(self, message: QueuedMessage) -> None:
        """`postqueue -i`: each recipient goes if its domain's current row lets Postfix through."""
        if message.queue_name not in ("deferred", "active", "incoming"):
            return
        left = []
        for recipient in message.recipients:
            row = self.policy_for(recipient.domain)
            if row is not None and row[0] == 1 and row[1] in recipient.deliverable_under:
                self.delivered.append((message.queue_id, recipient.domain))
            else:
                left.append(recipient)
        message.recipients = left
        if not left:
            del self.messages[message.queue_id]


def _py_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None:
        return "NoneType"
    return "list" if isinstance(value, list) else "dict"


def queue_routes(queue_of: Callable[[], StandinQueue], prefix: str) -> list[Route]:
    """The control API for the queue under `prefix` (dev mode and tests in another process)."""

    async def endpoint(request: Request) -> Response:
        queue = queue_of()
        if request.method == "DELETE":
            queue.clear()
        elif request.method == "POST":
            try:
                payload = await request.json()
                when = payload.pop("arrival_time", None)
                ids = queue.fill(
                    str(payload.pop("domain")),
                    arrival_time=datetime.fromtimestamp(float(when), UTC) if when is not None else None,
                    **payload,
                )
            except (KeyError, TypeError, ValueError) as exc:
                return JSONResponse({"error": f"bad fill: {exc}"}, 422)
            return JSONResponse({"queue_ids": ids}, 201)
        return JSONResponse(
            {
                "messages": queue.listing(),
                "forbidden": [c.__dict__ for c in queue.forbidden],
                "dockerapi": queue.dockerapi,
            }
        )

    return [Route(f"{prefix}/queue", endpoint, methods=["GET", "POST", "DELETE"])]
