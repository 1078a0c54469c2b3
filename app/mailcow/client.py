"""Async client for mailcow's tls-policy-map API: the one place in the project that knows its quirks.

The quirks are documented in /work/shared/mailcow-api.md; the ones handled here:

* Every call is stateless: cookies are never stored, because a returned `MCSESSID` keeps the session
  admin without a key and carries stale errors into later responses (§1). The key goes in every call.
* Logical errors come back as HTTP 200 with `danger`/`error` entries; an HTTP 200 with an EMPTY body
  is a server-side DB error and the statement was not applied (§5).
* 401/403 are never retried: ten auth failures in ten minutes get our IP banned by fail2ban (§1).
* add: no id in the answer, `active` must always be sent (missing means inactive; `0` adds an inactive
  row in one call), a policy outside
  the ENUM gives an empty body (checked here first), and a retried add after a lost response finds
  its own row: "tls_policy_map_entry_exists" (§3), which callers resolve with `find_policy`.
* get: `{}` means "none", `/{id}` adds a stray `"0": null`, the list order is undefined (§7).
* delete: a bare JSON array; unknown ids "succeed" (§6).
* mail queue (§12, `get_mailq`, `deliver`): recipients arrive as `"addr (reason)"` strings, only hex
  queue ids are acted on (others are refused here), and success is answered even for a vanished id.
  No method can send `flush`, `super_delete` or `delete/mailq`.
* edit: stores dest and policy verbatim, treats "" and "0" as "keep", and reports a duplicate dest
  under the wrong key `recipient_map_entry_exists` (§4); the first two are refused here, the third is
  normalised to `tls_policy_map_entry_exists`.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.request import Request as UrllibRequest

import httpx
from prometheus_client import Counter, Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from app.mailcow.checks import check_edit_dest, check_id, check_parameters, check_policy, check_queue_ids
from app.mailcow.dest import dest_key, lookup_candidates
from app.mailcow.errors import (
    MailcowAuthError,
    MailcowEmptyResponse,
    MailcowError,
    MailcowProtocolError,
    MailcowRejected,
    MailcowUnavailable,
)
from app.mailcow.mailq import (
    DELIVER_BATCH,
    EDIT_MAILQ_PATH,
    MAILQ_PATH,
    batches,
    check_delivered,
    deliver_body,
    read_mailq,
)
from app.mailcow.queue import QueueMessage

log = logging.getLogger("app.mailcow")

API: Final = "/api/v1"
EDITABLE: Final = frozenset({"dest", "policy", "parameters", "active"})

CALLS = Counter(
    "tlso_mailcow_calls_total", "mailcow API calls, by outcome (ok or error kind)", ["target", "op", "outcome"]
)
CALL_SECONDS = Histogram(
    "tlso_mailcow_call_seconds", "Duration of mailcow API calls, retries included", ["target", "op"]
)
ERRORS = Counter("tlso_mailcow_errors_total", "Failed mailcow API calls, by error kind", ["target", "kind"])
RETRIES = Counter("tlso_mailcow_retries_total", "Retried mailcow HTTP attempts", ["target", "op"])

# mailcow's lang.en-gb.json texts for the keys this API produces
MESSAGES: Final = {
    "tls_policy_map_dest_invalid": "Policy destination is invalid",
    "tls_policy_map_parameter_invalid": "Policy parameter is invalid",
    "tls_policy_map_entry_exists": 'A TLS policy map entry "%s" exists',
    "tls_policy_map_entry_saved": 'TLS policy map entry "%s" has been saved',
    "tls_policy_map_entry_deleted": "TLS policy map ID %s has been deleted",
    "access_denied": "Access denied or invalid form data",
}
# edit reports a duplicate dest under the recipient map's key (§4)
_MSG_KEY_ALIASES: Final = {"recipient_map_entry_exists": "tls_policy_map_entry_exists"}
_LANG_KEY = re.compile(r"[a-z0-9_]+")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRow:
    id: int
    dest: str
    policy: str
    parameters: str
    active: int
    created: str | None
    modified: str | None


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


class _NoCookies(CookieJar):
    """A cookie jar that never stores anything (see module docstring)."""

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: UrllibRequest) -> None:
        return None


class _Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass
class _Reply:
    status: int
    text: str
    attempts: int


class MailcowClient:
    """One mailcow instance's tls-policy-map API."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        name: str = "default",
        timeout: float = 10.0,
        attempts: int = 4,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        key = api_key.strip()
        if not key or not all(33 <= ord(ch) <= 126 for ch in key):
            # never echo the value: it is a secret
            raise ValueError("the mailcow API key is empty or contains characters not allowed in a header")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._key = _Secret(key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
            cookies=_NoCookies(),
            headers={"Accept": "application/json", "User-Agent": "tlsoverride"},
        )

    def __repr__(self) -> str:
        return f"MailcowClient(name={self.name!r}, base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- public API -----------------------------------------------------------------------------

    async def list_policies(self) -> list[PolicyRow]:
        """Every row of the TLS policy map, in no particular order."""
        return await self._call("list", "GET", f"{API}/get/tls-policy-map/all", None, self._parse_list)

    async def get_policy(self, id: int) -> PolicyRow | None:
        """The row with this id, or None."""
        row_id = check_id(id)
        return await self._call(
            "get", "GET", f"{API}/get/tls-policy-map/{row_id}", None, lambda r: self._parse_one(r, row_id)
        )

    async def find_policy(self, dest: str) -> PolicyRow | None:
        """The row whose dest matches, case-insensitively as mailcow's unique index does, or None."""
        wanted = lookup_candidates(dest)
        rows = await self.list_policies()
        matches = [row for row in rows if dest_key(row.dest) in wanted]
        exact = [row for row in matches if row.dest == dest]
        best = exact or matches
        return best[0] if best else None

    async def add_policy(self, dest: str, policy: str, parameters: str = "", *, active: bool = True) -> None:
        """Add a row (active unless told otherwise); mailcow returns no id, so use `find_policy(dest)` afterwards."""
        if not isinstance(dest, str) or not dest.strip():
            raise ValueError("dest must be a non-empty string")
        policy = check_policy(policy)
        check_parameters(parameters)
        # `active` is always sent: mailcow stores a missing one as 0, an inactive row
        body = {"dest": dest, "policy": policy, "parameters": parameters, "active": 1 if active else 0}
        await self._call("add", "POST", f"{API}/add/tls-policy-map", body, self._parse_added)

    async def edit_policy(self, id: int, **attrs: Any) -> None:
        """Change dest, policy, parameters and/or active of one row."""
        row_id = check_id(id)
        unknown = set(attrs) - EDITABLE
        if unknown:
            raise ValueError(f"cannot edit {sorted(unknown)}; editable: {sorted(EDITABLE)}")
        if not attrs:
            raise ValueError("nothing to edit")
        attr: dict[str, Any] = {}
        if "dest" in attrs:
            attr["dest"] = check_edit_dest(attrs["dest"])
        if "policy" in attrs:
            attr["policy"] = check_policy(attrs["policy"])
        if "parameters" in attrs:
            attr["parameters"] = check_parameters(attrs["parameters"])
        if "active" in attrs:
            active = attrs["active"]
            if isinstance(active, bool):
                active = int(active)
            if active not in (0, 1) or not isinstance(active, int):
                raise ValueError("active must be 0 or 1")
            attr["active"] = active
        body = {"items": [row_id], "attr": attr}
        await self._call("edit", "POST", f"{API}/edit/tls-policy-map", body, lambda r: self._parse_edited(r, row_id))

    async def delete_policies(self, ids: list[int]) -> None:
        """Delete rows; mailcow confirms unknown ids too, so verify with get/find when it matters."""
        checked = [check_id(i) for i in ids]
        if not checked:
            return
        await self._call(
            "delete", "POST", f"{API}/delete/tls-policy-map", checked, lambda r: self._parse_deleted(r, checked)
        )

    async def get_mailq(self) -> list[QueueMessage]:
        """The mail queue (mailcow lists at most 10,000 messages), recipients by domain only."""
        return await self._call("mailq", "GET", MAILQ_PATH, None, lambda r: read_mailq(r.text))

    async def deliver(self, queue_ids: Sequence[str], *, batch_size: int = DELIVER_BATCH) -> int:
        """Ask Postfix to deliver these queued messages now, in batches; how many ids were sent. Success
        says nothing about delivery: read the queue again to know."""
        ids = check_queue_ids(queue_ids)
        for batch in batches(ids, batch_size):
            await self._call("deliver", "POST", EDIT_MAILQ_PATH, deliver_body(batch), self._parse_delivered)
        return len(ids)

    # ---- transport ------------------------------------------------------------------------------

    async def _call(self, op: str, method: str, path: str, body: Any, parse: Callable[[_Reply], T]) -> T:
        started = time.perf_counter()
        outcome = "ok"
        attempts = 1
        try:
            reply = await self._with_retries(op, method, path, body)
            attempts = reply.attempts
            return parse(reply)
        except MailcowError as exc:
            exc.attempts = max(exc.attempts, attempts)
            outcome = exc.kind
            exc.target, exc.op = self.name, op
            ERRORS.labels(self.name, exc.kind).inc()
            raise
        finally:
            CALLS.labels(self.name, op, outcome).inc()
            CALL_SECONDS.labels(self.name, op).observe(time.perf_counter() - started)

    async def _with_retries(self, op: str, method: str, path: str, body: Any) -> _Reply:
        attempt_no = 0

        def before_sleep(state: RetryCallState) -> None:
            RETRIES.labels(self.name, op).inc()
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "mailcow %s %s failed (%s), attempt %d/%d, retrying in %.2fs",
                method,
                path,
                error,
                state.attempt_number,
                self.attempts,
                delay,
                extra={"target": self.name, "op": op},
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            # exponential backoff plus jitter (spelled portably: tenacity renamed wait_exponential_jitter's args)
            wait=wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
            + wait_random(0, self.backoff_initial),
            retry=retry_if_exception_type(MailcowUnavailable),
            before_sleep=before_sleep,
            reraise=True,
        )

        async def attempt() -> _Reply:
            nonlocal attempt_no
            attempt_no += 1
            return await self._send(op, method, path, body, attempt_no)

        try:
            return await retrying(attempt)
        except MailcowError as exc:
            exc.attempts = attempt_no
            if isinstance(exc, MailcowUnavailable) and attempt_no > 1:
                exc.message = f"{exc.message} (gave up after {attempt_no} attempts)"
                exc.args = (exc.message,)
            raise

    async def _send(self, op: str, method: str, path: str, body: Any, attempt_no: int) -> _Reply:
        headers = {"X-API-Key": self._key.reveal(), "Content-Type": "application/json"}
        content = json.dumps(body).encode() if body is not None else None
        started = time.perf_counter()
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            self._log_attempt(op, method, path, type(exc).__name__, started)
            raise MailcowUnavailable(f"{method} {path}: {type(exc).__name__} after {self._elapsed(started)}") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            self._log_attempt(op, method, path, type(exc).__name__, started)
            raise MailcowUnavailable(f"{method} {path}: {type(exc).__name__}: {self._redact(str(exc))}") from None
        except httpx.HTTPError as exc:
            self._log_attempt(op, method, path, type(exc).__name__, started)
            raise MailcowProtocolError(f"{method} {path}: {type(exc).__name__}: {self._redact(str(exc))}") from None
        self._log_attempt(op, method, path, response.status_code, started)
        text = response.text
        status = response.status_code
        if status == 200:
            return _Reply(status, text, attempt_no)
        detail = _error_text(text)
        if status == 401:
            raise MailcowAuthError(f"mailcow rejected the API key: {detail or 'authentication failed'}", status=401)
        if status == 403:
            what = detail or "403 with an empty body"
            raise MailcowAuthError(f"mailcow denied the call: {what} (read-only key?)", status=403)
        if status >= 500:
            raise MailcowUnavailable(f"{method} {path}: HTTP {status}", status=status)
        if 300 <= status < 400:
            where = response.headers.get("location", "?")
            raise MailcowProtocolError(f"{method} {path}: redirected to {where}; check the base URL", status=status)
        hint = {404: "wrong base URL or mailcow version?", 405: "wrong method", 400: "body was not valid JSON"}
        message = f"{method} {path}: HTTP {status} {detail or ''} ({hint.get(status, 'unexpected status')})"
        raise MailcowProtocolError(message, status=status)

    def _log_attempt(self, op: str, method: str, path: str, status: int | str, started: float) -> None:
        log.debug(
            "mailcow %s %s -> %s in %s",
            method,
            path,
            status,
            self._elapsed(started),
            extra={"target": self.name, "op": op},
        )

    @staticmethod
    def _elapsed(started: float) -> str:
        return f"{time.perf_counter() - started:.3f}s"

    def _redact(self, text: str) -> str:
        return text.replace(self._key.reveal(), "<redacted>")

    # ---- answers --------------------------------------------------------------------------------

    def _json(self, reply: _Reply, what: str) -> Any:
        if reply.text.strip() == "":
            raise MailcowEmptyResponse(
                f"{what}: HTTP 200 with an empty body (a mailcow DB error; nothing was applied)"
                if what != "get"
                else "get: HTTP 200 with an empty body (the API key did not reach mailcow, or a DB error)",
                status=200,
            )
        try:
            return json.loads(reply.text)
        except ValueError:
            raise MailcowProtocolError(f"{what}: the answer is not JSON: {self._redact(reply.text[:200])!r}") from None

    def _parse_row(self, data: Any) -> PolicyRow:
        try:
            if not isinstance(data, dict):
                raise TypeError("not an object")
            active = data["active"]
            parameters = data["parameters"]
            for name in ("dest", "policy"):
                if not isinstance(data[name], str):
                    raise TypeError(f"{name} is not a string")
            return PolicyRow(
                id=int(data["id"]),
                dest=data["dest"],
                policy=data["policy"],
                parameters="" if parameters is None else str(parameters),
                active=int(active),  # old docs show "1" as a string
                created=None if data["created"] is None else str(data["created"]),
                modified=None if data["modified"] is None else str(data["modified"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MailcowProtocolError(f"unexpected row shape ({exc}): {self._redact(repr(data)[:200])}") from None

    def _parse_list(self, reply: _Reply) -> list[PolicyRow]:
        data = self._json(reply, "list")
        if data == {}:  # mailcow's "no rows"
            return []
        if not isinstance(data, list):
            raise MailcowProtocolError(f"list: expected a JSON array, got {type(data).__name__}")
        return [self._parse_row(item) for item in data]

    def _parse_one(self, reply: _Reply, row_id: int) -> PolicyRow | None:
        data = self._json(reply, "get")
        if data == {}:
            return None
        if not isinstance(data, dict):
            raise MailcowProtocolError(f"get: expected a JSON object, got {type(data).__name__}")
        data.pop("0", None)  # json_api.php appends an undefined variable
        row = self._parse_row(data)
        if row.id != row_id:
            raise MailcowProtocolError(f"get: asked for id {row_id}, mailcow answered with id {row.id}")
        return row

    def _entries(self, reply: _Reply, op: str) -> list[dict[str, Any]]:
        """The message entries of an add/edit/delete answer, danger ones raised as errors."""
        data = self._json(reply, op)
        entries = [data] if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise MailcowProtocolError(f"{op}: unexpected answer {self._redact(reply.text[:200])!r}")
        fresh = []
        for entry in entries:
            trail = entry.get("log")
            if isinstance(trail, list) and trail[:1] == ["exception_handler"]:
                # Only a reused session can show this, and it belongs to an earlier request.
                log.warning("mailcow %s: ignoring a stale error from an earlier request: %s", op, entry.get("msg"))
                continue
            fresh.append(entry)
        for entry in fresh:
            if entry.get("type") in ("danger", "error"):
                raise self._rejection(op, entry, reply.attempts)
        return fresh

    def _rejection(self, op: str, entry: dict[str, Any], attempts: int) -> MailcowError:
        msg = entry.get("msg")
        raw_key: str | None = None
        args: tuple[str, ...] = ()
        if isinstance(msg, list) and msg and isinstance(msg[0], str):
            raw_key, args = msg[0], tuple(html.unescape(str(a)) for a in msg[1:])
        elif isinstance(msg, str) and _LANG_KEY.fullmatch(msg):
            raw_key = msg
        text = msg if isinstance(msg, str) else json.dumps(msg)
        if raw_key is None and text == "Cannot find attributes in post data":
            return MailcowProtocolError(f"{op}: mailcow found no attributes in the request body")
        key = _MSG_KEY_ALIASES.get(raw_key, raw_key) if raw_key else None
        if key is not None and key in MESSAGES:
            template = MESSAGES[key]
            human = template % (args[0] if args else "?") if "%s" in template else template
        elif raw_key == "mysql_error":
            human = "mailcow database error"
        else:
            human = text
        if raw_key is None and text == "Cannot add item":
            # The add branch answers this when the caller is not admin: the key did not arrive (a proxy
            # dropping X-API-Key). An authentication problem, so the target pauses instead of hammering on.
            return MailcowAuthError(
                f"{op}: Cannot add item (mailcow did not treat the call as admin: was the X-API-Key header dropped?)",
                target=self.name,
                op=op,
            )
        return MailcowRejected(f"{op}: {self._redact(human)}", msg_key=key, args=args, raw_msg_key=raw_key)

    def _parse_added(self, reply: _Reply) -> None:
        for entry in self._entries(reply, "add"):
            if entry.get("type") == "success" and _key_of(entry) == "tls_policy_map_entry_saved":
                return
        raise MailcowProtocolError(f"add: no confirmation in {self._redact(reply.text[:200])!r}")

    def _parse_edited(self, reply: _Reply, row_id: int) -> None:
        for entry in self._entries(reply, "edit"):
            if entry.get("type") == "success" and _key_of(entry) == "tls_policy_map_entry_saved":
                return
        raise MailcowProtocolError(f"edit: no confirmation for id {row_id} in {self._redact(reply.text[:200])!r}")

    def _parse_delivered(self, reply: _Reply) -> None:
        check_delivered(self._entries(reply, "deliver"))

    def _parse_deleted(self, reply: _Reply, ids: list[int]) -> None:
        confirmed = {
            str(msg[1])
            for entry in self._entries(reply, "delete")
            if entry.get("type") == "success"
            and _key_of(entry) == "tls_policy_map_entry_deleted"
            and isinstance(msg := entry.get("msg"), list)
            and len(msg) > 1
        }
        missing = [i for i in ids if str(i) not in confirmed]
        if missing:
            raise MailcowProtocolError(f"delete: mailcow did not confirm ids {missing}")


# --------------------------------------------------------------------------------------------------
# Reading mailcow's answers
# --------------------------------------------------------------------------------------------------


def _error_text(text: str) -> str | None:
    """The `msg` of an error body such as `{"type":"error","msg":"authentication failed"}`."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    msg = data.get("msg") if isinstance(data, dict) else None
    return msg if isinstance(msg, str) else None


def _key_of(entry: dict[str, Any]) -> str | None:
    msg = entry.get("msg")
    if isinstance(msg, list) and msg and isinstance(msg[0], str):
        return msg[0]
    return msg if isinstance(msg, str) else None
