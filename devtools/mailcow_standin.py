"""TEST DOUBLE of mailcow's `tls-policy-map` REST API. This is not mailcow.

It reproduces, as literally as we can, the contract and the quirks written down in
/work/shared/mailcow-api.md (mailcow-dockerized 06424670, PHP 8.2, MariaDB 10.11 in strict mode):
authentication (`X-API-Key` stripped to `[A-Za-z0-9-]`, rw/ro keys, allow_from, skip_ip_check,
text/html 401s), the per-action behaviour without a key, 403/404/405/400 answers, the form-field
route, the browser guard, the `MCSESSID` session that keeps auth and carries stale errors, add
normalisation (trim + IDNA UTS46) and validation, `intval` semantics, the case-insensitive unique
index, the ENUM check, the "HTTP 200 with an empty body" failures, the exact response shapes, the edit
and delete quirks, and the `created`/`modified` columns. The tests and the project's dev mode use it.

Only the `tls-policy-map` and `mailq` categories exist here (the mail queue lives in
devtools/standin_queue.py; its calls are logged and faulted as op `mailq`); every other category answers
like an unknown route.
The session cookie is sent without `Secure` so that the cookie pitfall can be reproduced over plain
HTTP.

Everything under `/__standin__/` is a control API that real mailcow does NOT have, for tests only:

* `POST /__standin__/faults` `{"op": "add|delete|get|edit|mailq|any", "mode": "http500|empty|timeout|
  drop_after_commit", "count": 1, "delay": 0}` arms a fault for the next `count` matching API calls.
  `http500` answers 500 without touching the state; `empty` answers 200 with an empty body without
  touching the state; `timeout` waits `delay` seconds (default 30) and then handles the call normally,
  so a client with a shorter read timeout gives up while the change may still be applied (this needs a
  real socket: httpx's ASGITransport enforces no timeouts); `drop_after_commit` handles the call and
  then answers 500, like a response lost after the commit. `delay` also delays the other modes.
  `GET` lists the armed faults, `DELETE` disarms them all.
* `POST /__standin__/reset` forgets rows, faults, calls and sessions, and restarts ids at 1.
* `GET /__standin__/rows` lists the table; `POST /__standin__/rows` inserts a row directly (a "foreign"
  row, or one only edit could produce), checked only against the unique index (409).
* `GET /__standin__/calls` is the call log (method, path, op, status, how the caller authenticated,
  whether it sent a cookie, the body); the API key is never stored. `DELETE` clears it.
* `POST /__standin__/keys` adds or replaces an API key (`StandinKey` fields); the key is not echoed.
* `/__standin__/queue`: the mail queue (devtools/standin_queue.py).

In process (tests), `MailcowStandin.history()` lists every state a row was ever in (after each insert,
update or delete): whether Postfix could ever have seen a row active, for instance.

It lives outside the `app` package, so the product never ships it. Run it in another process:
`python -m devtools.mailcow_standin --port 8081 --api-key KEY` (from the source checkout's root).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

from idna.core import IDNAError, uts46_remap
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devtools.standin_queue import QueueAnswer, StandinQueue, queue_routes

CONTROL_PREFIX = "/__standin__"
SESSION_COOKIE = "MCSESSID"
SESSION_LIFETIME = 10800
MAX_SESSIONS = 5000
MAX_CALLS = 10000

POLICY_ENUM = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")
FAULT_OPS = ("add", "delete", "get", "edit", "mailq", "any")
FAULT_MODES = ("http500", "empty", "timeout", "drop_after_commit")

_JSON = "application/json"
_HTML = "text/html; charset=UTF-8"


@dataclass
class StandinKey:
    """One row of mailcow's `api` table."""

    key: str
    access: Literal["rw", "ro"] = "rw"
    allow_from: list[str] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    skip_ip_check: bool = False
    active: bool = True


# --------------------------------------------------------------------------------------------------
# PHP semantics the API code relies on (PHP 8.2, 64-bit)
# --------------------------------------------------------------------------------------------------

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_PHP_WS = " \t\n\r\x0b\x0c"
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMERIC_RE = re.compile(rf"[{_PHP_WS}]*{_NUM}[{_PHP_WS}]*")
_LEADING_NUMERIC_RE = re.compile(rf"[{_PHP_WS}]*({_NUM})")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

PhpArray = dict[str, Any] | list[Any]


class PhpException(Exception):
    """An uncaught PHP Throwable: mailcow's global handler stores `entry` in the session, prints nothing."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__(entry.get("msg"))
        self.entry = entry


def _mysql_error(sqlstate: str, code: int, text: str) -> PhpException:
    return PhpException(
        {"type": "danger", "log": ["exception_handler"], "msg": ["mysql_error", {"errorInfo": [sqlstate, code, text]}]}
    )


def _type_error(text: str) -> PhpException:
    # Shape not verified against mailcow (only PDOExceptions were observed); the body is empty either way.
    return PhpException(
        {"type": "danger", "log": ["exception_handler"], "msg": f"An unknown error occured: TypeError: {text}"}
    )


def _wrap_int(value: int) -> int:
    return (value - _INT_MIN) % 2**64 + _INT_MIN


def php_is_numeric(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and _NUMERIC_RE.fullmatch(value) is not None


def _numeric_value(text: str) -> int | float:
    """The number in a numeric string (PHP: int unless it overflows or has a fraction/exponent)."""
    stripped = text.strip(_PHP_WS)
    if re.fullmatch(r"[+-]?\d+", stripped):
        number = int(stripped)
        return number if _INT_MIN <= number <= _INT_MAX else float(number)
    return float(stripped)


def php_intval(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return _wrap_int(value)
    if isinstance(value, float):
        return _wrap_int(int(value)) if math.isfinite(value) else 0
    if isinstance(value, str):
        match = _LEADING_NUMERIC_RE.match(value)
        if match is None:
            return 0
        number = _numeric_value(match.group(1))
        if isinstance(number, int):
            return number
        if not math.isfinite(number):
            return 0
        # string → float → int saturates (zend_dval_to_lval_cap)
        if number >= 2.0**63:
            return _INT_MAX
        if number < -(2.0**63):
            return _INT_MIN
        return int(number)
    if isinstance(value, dict | list):
        return 1 if value else 0
    return 0


def php_empty(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        return value in ("", "0")
    if isinstance(value, dict | list):
        return not value
    return False


def php_isset(data: dict[str, Any], key: str) -> bool:
    return data.get(key) is not None


def _php_float_str(value: float) -> str:
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    text = format(value, ".14G")
    if "E" in text:
        mantissa, exponent = text.split("E")
        if "." not in mantissa:
            mantissa += ".0"
        sign = exponent[0]
        text = f"{mantissa}E{sign}{int(exponent[1:])}"
    return "-0" if text == "-0" else text


def php_string(value: Any, function: str = "trim") -> str:
    """Implicit string conversion of a scalar argument; arrays raise TypeError as in PHP 8."""
    if isinstance(value, str):
        return value
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _php_float_str(value)
    raise _type_error(f"{function}(): Argument #1 must be of type string, array given")


def php_trim(text: str) -> str:
    return text.strip(" \t\n\r\0\x0b")


def php_strtolower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def htmlspecialchars(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace('"', "&quot;")
        .replace("'", "&#039;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def _php_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value not in ("", "0")
    return not php_empty(value)


def php_loose_eq(left: Any, right: Any) -> bool:
    """PHP 8 `==` for the scalar cases the API meets."""
    if isinstance(left, dict | list) or isinstance(right, dict | list):
        return isinstance(left, dict | list) and isinstance(right, dict | list) and left == right
    if left is None and right is None:
        return True
    if left is None or right is None:
        other = right if left is None else left
        return other == "" if isinstance(other, str) else not _php_bool(other)
    if isinstance(left, bool) or isinstance(right, bool):
        return _php_bool(left) == _php_bool(right)
    if isinstance(left, str) and isinstance(right, str):
        if php_is_numeric(left) and php_is_numeric(right):
            return _numeric_value(left) == _numeric_value(right)
        return left == right
    if isinstance(left, str):
        left, right = right, left
    # left is a number now
    if isinstance(right, str):
        if php_is_numeric(right):
            return bool(left == _numeric_value(right))
        return php_string(left) == right
    return bool(left == right)


def php_array(value: Any) -> PhpArray:
    """`(array)$value`."""
    if value is None:
        return []
    if isinstance(value, dict | list):
        return value
    return [value]


def php_values(array: PhpArray) -> list[Any]:
    return list(array.values()) if isinstance(array, dict) else list(array)


def php_mapping(array: PhpArray) -> dict[str, Any]:
    return array if isinstance(array, dict) else {str(i): v for i, v in enumerate(array)}


class _BadJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJson(name)


def _parse_int(text: str) -> int | float:
    number = int(text)
    return number if _INT_MIN <= number <= _INT_MAX else float(text)


def _check_decoded(value: Any, depth: int = 1) -> None:
    if depth > 512:
        raise _BadJson("depth")
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise _BadJson("lone surrogate")
    elif isinstance(value, list):
        for item in value:
            _check_decoded(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_decoded(key, depth + 1)
            _check_decoded(item, depth + 1)


def php_json_decode(raw: str | bytes) -> Any:
    """`json_decode($raw, true)`: None for invalid JSON, exactly like a literal `null`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
        _check_decoded(value)
    except (ValueError, RecursionError):
        return None
    return value


def _phpify(value: Any) -> Any:
    """PHP arrays as json_encode prints them: empty → [], keys 0..n-1 → list, else object."""
    if isinstance(value, dict):
        if list(value.keys()) == [str(i) for i in range(len(value))]:
            return [_phpify(v) for v in value.values()]
        return {k: _phpify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_phpify(v) for v in value]
    return value


def php_json_encode(value: Any) -> str | None:
    """`json_encode($value)`: compact, `\\uXXXX` for non-ASCII, `\\/`; None where PHP returns false."""
    try:
        text = json.dumps(_phpify(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return None
    return text.replace("/", "\\/")


def php_json_pretty(value: Any) -> str:
    """`json_encode($value, JSON_UNESCAPED_UNICODE | JSON_PRETTY_PRINT)`."""
    text = json.dumps(_phpify(value), ensure_ascii=False, indent=4)
    return text.replace("/", "\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# --------------------------------------------------------------------------------------------------
# idn_to_ascii($dest, IDNA_DEFAULT, INTL_IDNA_VARIANT_UTS46) as ICU does it
# --------------------------------------------------------------------------------------------------

# IDNA_DEFAULT means transitional processing: the four deviation characters are mapped.
_DEVIATIONS = {"\u00df": "ss", "\u03c2": "\u03c3", "\u200c": "", "\u200d": ""}


def _label_ok(label: str) -> bool:
    if label.startswith("-") or label.endswith("-"):
        return False
    if len(label) >= 4 and label[2:4] == "--":
        return False
    return not unicodedata.category(label[0]).startswith("M")


def idn_to_ascii(domain: str) -> str | None:
    """UTS46 ToASCII without STD3 rules, bidi or CONTEXTJ checks; None where PHP returns false."""
    if domain == "":
        return None
    try:
        mapped = uts46_remap(domain, std3_rules=False)
    except (IDNAError, UnicodeError, IndexError):
        return None
    mapped = unicodedata.normalize("NFC", "".join(_DEVIATIONS.get(ch, ch) for ch in mapped))
    labels = mapped.split(".")
    root = len(labels) > 1 and labels[-1] == ""
    if root:
        labels.pop()
    out: list[str] = []
    for label in labels:
        if label == "":
            return None
        if label.startswith("xn--"):
            try:
                decoded = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return None
            if decoded == "" or decoded.isascii() or not _label_ok(decoded):
                return None
            try:
                if uts46_remap(decoded, std3_rules=False) != decoded:
                    return None
            except (IDNAError, UnicodeError, IndexError):
                return None
            ascii_label = label
        else:
            if not _label_ok(label):
                return None
            ascii_label = label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        if len(ascii_label) > 63:
            return None
        out.append(ascii_label)
    result = ".".join(out) + ("." if root else "")
    if len(result) > (254 if root else 253):
        return None
    return result


# --------------------------------------------------------------------------------------------------
# The table and MariaDB's view of it
# --------------------------------------------------------------------------------------------------


def collation_key(text: str) -> str:
    """utf8mb4_general_ci, approximately: case- and accent-insensitive, trailing spaces ignored."""
    decomposed = unicodedata.normalize("NFD", text.rstrip(" "))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).upper()


@dataclass
class PolicyRecord:
    id: int
    dest: str
    policy: str
    parameters: str
    active: int
    created: str
    modified: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _mysql_number(value: Any) -> float | None:
    """How MariaDB compares `id = :value` for a bound PHP value; raises on truncation (strict mode)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    text = php_string(value, "PDOStatement::execute")
    stripped = text.strip(" ")
    if stripped == "":
        return 0.0
    if php_is_numeric(stripped):
        return float(_numeric_value(stripped))
    raise _mysql_error("22007", 1292, f"Truncated incorrect DOUBLE value: '{text}'")


class PolicyTable:
    """`tls_policy_override` with the column checks of MariaDB strict mode."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self.rows: dict[int, PolicyRecord] = {}
        self.next_id = 1
        # Every state a row was ever in (after each insert, update or delete): what Postfix could have seen.
        self.history: list[dict[str, Any]] = []

    def _remember(self, op: str, row: PolicyRecord) -> None:
        self.history.append({"op": op, **row.as_json()})

    def timestamp(self) -> str:
        return self._now().strftime("%Y-%m-%d %H:%M:%S")

    def ids(self) -> list[int]:
        """`SELECT id FROM tls_policy_override`: InnoDB reads it from the `dest` index."""
        return [row.id for row in sorted(self.rows.values(), key=lambda r: (collation_key(r.dest), r.id))]

    def details(self, row_id: int) -> PolicyRecord | None:
        return self.rows.get(row_id)

    @staticmethod
    def _enum(policy: str) -> str:
        for value in POLICY_ENUM:
            if collation_key(policy) == collation_key(value):
                return value
        # a numeric string that is no member is taken as the member's index
        if re.fullmatch(r"\d+", policy.strip(" ")) and 1 <= int(policy) <= len(POLICY_ENUM):
            return POLICY_ENUM[int(policy) - 1]
        raise _mysql_error("01000", 1265, "Data truncated for column 'policy' at row 1")

    def _check_row(self, dest: str, policy: str, parameters: str, active: int, own_id: int | None) -> str:
        if len(dest) > 255:
            raise _mysql_error("22001", 1406, "Data too long for column 'dest' at row 1")
        canonical = self._enum(policy)
        if len(parameters) > 255:
            raise _mysql_error("22001", 1406, "Data too long for column 'parameters' at row 1")
        if not -128 <= active <= 127:
            raise _mysql_error("22003", 1264, "Out of range value for column 'active' at row 1")
        key = collation_key(dest)
        for row in self.rows.values():
            if row.id != own_id and collation_key(row.dest) == key:
                raise _mysql_error("23000", 1062, f"Duplicate entry '{dest}' for key 'dest'")
        return canonical

    def insert(self, dest: str, policy: str, parameters: str, active: int) -> PolicyRecord:
        canonical = self._check_row(dest, policy, parameters, active, None)
        row = PolicyRecord(self.next_id, dest, canonical, parameters, active, self.timestamp())
        self.rows[row.id] = row
        self.next_id += 1
        self._remember("insert", row)
        return row

    def update(self, where_id: Any, dest: str, policy: str, parameters: str, active: int) -> None:
        number = _mysql_number(where_id)
        target = next((r for r in self.rows.values() if float(r.id) == number), None)
        canonical = self._check_row(dest, policy, parameters, active, target.id if target else None)
        if target is None:
            return
        new = (dest, canonical, parameters, active)
        if new != (target.dest, target.policy, target.parameters, target.active):
            target.dest, target.policy, target.parameters, target.active = new
            target.modified = self.timestamp()
            self._remember("update", target)

    def delete(self, where_id: Any) -> None:
        number = _mysql_number(where_id)
        for row in [r for r in self.rows.values() if float(r.id) == number]:
            del self.rows[row.id]
            self._remember("delete", row)


# --------------------------------------------------------------------------------------------------
# Sessions, faults, call log
# --------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    expires: float
    role: str | None = None
    username: str | None = None
    api_access: str | None = None
    api: bool = False
    ret: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Fault:
    op: str
    mode: str
    count: int = 1
    delay: float = 0.0


@dataclass
class _Outcome:
    status: int
    content_type: str
    body: str
    auth: str
    session_id: str


class _Exit(Exception):
    """PHP's `exit` after printing a response."""

    def __init__(self, status: int, body: str, content_type: str = _JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def _error(msg: str) -> str:
    return cast(str, php_json_encode({"type": "error", "msg": msg}))


_REQUEST_INCOMPLETE = _error("Cannot find attributes in post data")


def _ip_allowed(remote: str, allow_from: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    for entry in allow_from:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            continue
        if any(candidate.version == network.version and candidate in network for candidate in candidates):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# The API (json_api.php + sessions.inc.php + functions.tls_policy_maps.inc.php)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    method: str
    rest: str
    headers: dict[str, str]
    body: bytes
    remote: str
    session_id: str | None


class MailcowStandin:
    """State and behaviour of the double; `create_standin_app` wraps it in an ASGI app."""

    def __init__(self, keys: list[StandinKey] | None = None, now: Callable[[], datetime] | None = None) -> None:
        self._lock = threading.Lock()
        self._now = now or (lambda: datetime.now(UTC))
        self.keys: list[StandinKey] = list(keys or [])
        self.table = PolicyTable(self._now)
        self.sessions: dict[str, _Session] = {}
        self.faults: list[Fault] = []
        self.calls: list[dict[str, Any]] = []
        self.auth_failures: list[tuple[datetime, str]] = []  # what mailcow's netfilter counts, per IP
        self._seq = itertools.count(1)
        self.queue = StandinQueue(self._policy_for, self._now)

    # ---- control API helpers --------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.table = PolicyTable(self._now)
            self.sessions.clear()
            self.faults.clear()
            self.calls.clear()
            self.auth_failures.clear()
            self.queue.clear()

    def banned(self, remote: str) -> bool:
        """Whether mailcow's netfilter would have banned `remote` by now: 10 failed logins within 600 s,
        banned for 1800 s. The stand-in only keeps the count (a real ban drops packets at the firewall,
        which an ASGI app cannot imitate); tests assert that a client never gets there."""
        with self._lock:
            times = sorted(at for at, ip in self.auth_failures if ip == remote)
        for n in range(len(times) - 9):
            if times[n + 9] - times[n] <= timedelta(seconds=600) and self._now() - times[n + 9] < timedelta(
                seconds=1800
            ):
                return True
        return False

    def _auth_failed(self, remote: str) -> None:  # called from handle(), which holds the lock
        self.auth_failures.append((self._now(), remote))

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def log_call(self, record: dict[str, Any]) -> None:
        with self._lock:
            record["seq"] = next(self._seq)
            self.calls.append(record)
            if len(self.calls) > MAX_CALLS:  # dev mode runs for days
                del self.calls[: len(self.calls) - MAX_CALLS]

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def armed_faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self.faults]

    def set_key(self, key: StandinKey) -> None:
        with self._lock:
            self.keys = [k for k in self.keys if k.key != key.key] + [key]

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.table.rows[i].as_json() for i in sorted(self.table.rows)]

    def history(self, dest: str | None = None) -> list[dict[str, Any]]:
        """Each state rows were in, in order (`op`: seed, insert, update, delete), optionally for one dest."""
        with self._lock:
            key = collation_key(dest) if dest is not None else None
            return [dict(h) for h in self.table.history if key is None or collation_key(h["dest"]) == key]

    def seed_row(
        self,
        dest: str,
        policy: str = "encrypt",
        parameters: str = "",
        active: int = 1,
        *,
        row_id: int | None = None,
        created: str | None = None,
        modified: str | None = None,
    ) -> dict[str, Any]:
        """Insert a row as another client (or the UI's edit form) could have left it."""
        if policy not in POLICY_ENUM:
            raise ValueError(f"policy must be one of {POLICY_ENUM}")
        with self._lock:
            key = collation_key(dest)
            if any(collation_key(r.dest) == key for r in self.table.rows.values()):
                raise ValueError(f"Duplicate entry '{dest}' for key 'dest'")
            new_id = row_id if row_id is not None else self.table.next_id
            if new_id in self.table.rows:
                raise ValueError(f"Duplicate entry '{new_id}' for key 'PRIMARY'")
            row = PolicyRecord(new_id, dest, policy, parameters, active, created or self.table.timestamp(), modified)
            self.table.rows[new_id] = row
            self.table._remember("seed", row)
            self.table.next_id = max(self.table.next_id, new_id + 1)
            return row.as_json()

    def _policy_for(self, domain: str) -> tuple[int, str] | None:
        """(active, policy) of the row Postfix would use for mail to `domain` now (the queue's deliver)."""
        key = collation_key(domain)
        row = next((r for r in list(self.table.rows.values()) if collation_key(r.dest) == key), None)
        return None if row is None else (row.active, row.policy)

    def _take_fault(self, op: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.op in (op, "any") and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    # ---- sessions -------------------------------------------------------------------------------
    def _session(self, session_id: str | None) -> tuple[str, _Session]:
        now = time.monotonic()
        if session_id is not None:
            found = self.sessions.get(session_id)
            if found is not None and found.expires > now:
                found.expires = now + SESSION_LIFETIME
                return session_id, found
        if len(self.sessions) >= MAX_SESSIONS:
            for sid in [s for s, v in self.sessions.items() if v.expires <= now]:
                del self.sessions[sid]
            while len(self.sessions) >= MAX_SESSIONS:
                del self.sessions[next(iter(self.sessions))]
        new_id = secrets.token_hex(13)
        session = _Session(expires=now + SESSION_LIFETIME)
        self.sessions[new_id] = session
        return new_id, session

    # ---- one API call ---------------------------------------------------------------------------
    def handle(self, call: _Call) -> _Outcome:
        with self._lock:
            session_id, session = self._session(call.session_id)
            auth = "session" if session.role is not None else "none"
            try:
                auth = self._authenticate(call, session, auth)
            except _Exit as stop:
                return _Outcome(stop.status, stop.content_type, stop.body, "rejected", session_id)
            try:
                self._browser_guard(call)
                body = self._route(call, session)
            except _Exit as stop:
                return _Outcome(stop.status, stop.content_type, stop.body, auth, session_id)
            except PhpException as exc:
                # global exception handler: into the session, nothing printed, no cleanup at the end
                session.ret.append(exc.entry)
                return _Outcome(200, _JSON, "", auth, session_id)
            if session.api:
                session.ret = []
            return _Outcome(200, _JSON, body, auth, session_id)

    def _authenticate(self, call: _Call, session: _Session, auth: str) -> str:
        raw_key = call.headers.get("x-api-key")
        if raw_key is not None and not php_empty(raw_key):
            key = re.sub(r"[^a-zA-Z0-9-]", "", raw_key)
            found = next((k for k in self.keys if k.active and k.key == key), None)
            if found is None:
                self._auth_failed(call.remote)
                raise _Exit(401, _error("authentication failed"), _HTML)
            if not found.skip_ip_check and not _ip_allowed(call.remote, found.allow_from):
                self._auth_failed(call.remote)
                raise _Exit(401, _error(f"api access denied for ip {call.remote}"), _HTML)
            session.role, session.username = "admin", "API"
            session.api_access, session.api = found.access, True
            auth = f"key-{found.access}"
        return auth

    @staticmethod
    def _browser_guard(call: _Call) -> None:
        sec_fetch_dest = call.headers.get("sec-fetch-dest")
        if sec_fetch_dest is not None and sec_fetch_dest != "empty":
            raise _Exit(403, "")

    def _route(self, call: _Call, session: _Session) -> str:
        query = call.rest.split("/")
        action = query[0]
        category = query[1] if len(query) > 1 else None
        obj = query[2] if len(query) > 2 else None
        post = self._post_fields(call, action)

        if action == "add":
            if session.api_access == "ro":
                raise _Exit(403, _error("API read/write access denied"))
            if "attr" not in post:
                raise _Exit(200, _REQUEST_INCOMPLETE)
            attr = php_mapping(php_array(php_json_decode(post["attr"])))
            attr.pop("csrf_token", None)
            self._assert_method(call, "POST")
            if category != "tls-policy-map":
                raise _route_not_found()
            return self._process_return("add", self._add(session, attr), session)
        if action == "get":
            self._assert_method(call, "GET")
            if session.role is None:
                return ""
            if category == "mailq":
                return _queue_reply(self.queue.get(obj))
            if category != "tls-policy-map":
                raise _route_not_found()
            return self._get(obj)
        if action in ("delete", "edit"):
            if session.api_access == "ro" or session.username is None:
                raise _Exit(403, _error("API read/write access denied"))
            if action == "delete":
                if "items" not in post:
                    raise _Exit(200, _REQUEST_INCOMPLETE)
                items = php_array(php_json_decode(post["items"]))
                self._assert_method(call, "POST")
                if category == "mailq":
                    return _queue_reply(self.queue.delete(items))
                if category != "tls-policy-map":
                    raise _route_not_found()
                return self._process_return("delete", self._delete(session, {"id": items}), session)
            if "attr" not in post:
                raise _Exit(200, _REQUEST_INCOMPLETE)
            attr = php_mapping(php_array(php_json_decode(post["attr"])))
            attr.pop("csrf_token", None)
            edit_items = php_array(php_json_decode(post["items"])) if "items" in post else None
            self._assert_method(call, "POST")
            if category == "mailq":
                return _queue_reply(self.queue.edit(edit_items, attr))
            if category != "tls-policy-map":
                raise _route_not_found()
            data: dict[str, Any] = {"id": edit_items}
            data.update(attr)
            return self._process_return("edit", self._edit(session, data), session)
        raise _route_not_found()

    @staticmethod
    def _assert_method(call: _Call, method: str) -> None:
        if call.method != method:
            raise _Exit(405, _error(f"only {method} method is allowed"))

    @staticmethod
    def _post_fields(call: _Call, action: str) -> dict[str, str]:
        content_type = call.headers.get("content-type", "")
        post: dict[str, str] = {}
        if call.method == "POST" and content_type.lower().startswith("application/x-www-form-urlencoded"):
            text = call.body.decode("utf-8", errors="replace")
            for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
                post[name] = value
        if "application/json" not in content_type:
            return post
        request = call.body.decode("utf-8", errors="replace")
        decoded = php_json_decode(call.body)
        if action != "get" and decoded is None:
            raise _Exit(400, _error("Request body doesn't contain valid json!"))
        if action == "add":
            post["attr"] = request
        elif action == "delete":
            post["items"] = request
        elif action == "edit":
            if isinstance(decoded, str):
                raise _type_error("Cannot access offset of type string on string")
            attr = decoded.get("attr") if isinstance(decoded, dict) else None
            items = decoded.get("items") if isinstance(decoded, dict) else None
            post["attr"] = php_json_encode(attr) or ""
            post["items"] = php_json_encode(items) or ""
        return post

    @staticmethod
    def _process_return(kind: str, result: bool | None, session: _Session) -> str:
        if session.ret:
            encoded = php_json_encode(session.ret)
            return encoded if encoded is not None else ""
        if result is False:
            return _error(f"Cannot {kind} item")
        return cast(str, php_json_encode({"type": "success", "msg": "Task completed"}))

    # ---- tls_policy_maps() ----------------------------------------------------------------------
    @staticmethod
    def _entry(kind: str, action: str, data: Any, msg: Any) -> dict[str, Any]:
        return {"type": kind, "log": ["tls_policy_maps", action, data, None], "msg": msg}

    @staticmethod
    def _parameters_invalid(parameters: Any) -> bool:
        pieces = php_string(parameters, "explode").split(" ")
        return any(re.search(r"(.+)=(.+)", piece) is None for piece in pieces)

    def _add(self, session: _Session, data: dict[str, Any]) -> bool | None:
        if session.role != "admin":
            return False
        dest = idn_to_ascii(php_trim(php_string(data.get("dest"))))
        policy = php_strtolower(php_trim(php_string(data.get("policy"))))
        if dest is None or dest in ("", ".", "*", "@"):
            session.ret.append(self._entry("danger", "add", data, "tls_policy_map_dest_invalid"))
            return False
        raw_parameters = data.get("parameters")
        parameters = raw_parameters if php_isset(data, "parameters") and not php_empty(raw_parameters) else ""
        if not php_empty(parameters) and self._parameters_invalid(parameters):
            session.ret.append(self._entry("danger", "add", data, "tls_policy_map_parameter_invalid"))
            return False
        active = php_intval(data.get("active"))
        for row_id in self.table.ids():
            row = self.table.details(row_id)
            if row is not None and php_loose_eq(row.dest, dest):
                msg = ["tls_policy_map_entry_exists", htmlspecialchars(dest)]
                session.ret.append(self._entry("danger", "add", data, msg))
                return False
        self.table.insert(dest, policy, php_string(parameters), active)
        session.ret.append(self._entry("success", "add", data, ["tls_policy_map_entry_saved", htmlspecialchars(dest)]))
        return None

    def _edit(self, session: _Session, data: dict[str, Any]) -> bool | None:
        if session.role != "admin":
            return False
        for item in php_values(php_array(data.get("id"))):
            current = self.table.details(php_intval(item))
            if current is None:
                session.ret.append(self._entry("danger", "edit", data, "access_denied"))
                continue
            active = php_intval(data["active"]) if php_isset(data, "active") else current.active
            dest = data["dest"] if not php_empty(data.get("dest")) else current.dest
            policy = data["policy"] if not php_empty(data.get("policy")) else current.policy
            parameters = data["parameters"] if php_isset(data, "parameters") else current.parameters
            if any(php_loose_eq(dest, bad) for bad in ("", ".", "*", "@")):
                session.ret.append(self._entry("danger", "edit", data, "tls_policy_map_dest_invalid"))
                return False
            if not php_empty(parameters) and self._parameters_invalid(parameters):
                session.ret.append(self._entry("danger", "edit", data, "tls_policy_map_parameter_invalid"))
                return False
            dest_text = htmlspecialchars(php_string(dest, "htmlspecialchars"))
            for other_id in self.table.ids():
                if php_loose_eq(other_id, item):
                    continue
                other = self.table.details(other_id)
                if other is not None and php_loose_eq(other.dest, dest):
                    # sic: mailcow answers with the recipient map's message key here
                    msg = ["recipient_map_entry_exists", dest_text]
                    session.ret.append(self._entry("danger", "edit", data, msg))
                    return False
            self.table.update(
                item,
                php_string(dest),
                php_string(policy) if not isinstance(policy, dict | list) else "Array",
                php_string(parameters, "explode"),
                active,
            )
            session.ret.append(self._entry("success", "edit", data, ["tls_policy_map_entry_saved", dest_text]))
        return None

    def _delete(self, session: _Session, data: dict[str, Any]) -> bool | None:
        if session.role != "admin":
            return False
        for item in php_values(php_array(data.get("id"))):
            if not php_is_numeric(item):
                return False
            self.table.delete(item)
            msg = ["tls_policy_map_entry_deleted", htmlspecialchars(php_string(item))]
            session.ret.append(self._entry("success", "delete", data, msg))
        return None

    def _get(self, obj: str | None) -> str:
        if obj == "all":
            data = [row.as_json() for i in self.table.ids() if (row := self.table.details(i)) is not None]
            return php_json_pretty(data) if data else "{}"
        row = self.table.details(php_intval(obj))
        if row is None:
            return "{}"
        details = row.as_json()
        details["0"] = None  # sic: `$data[] = $details;` with `$details` undefined
        return php_json_pretty(details)


def _queue_reply(answer: QueueAnswer) -> str:
    if isinstance(answer.body, str):
        if answer.status != 200:
            raise _Exit(answer.status, answer.body, answer.content_type)
        return answer.body
    if isinstance(answer.body, list) and answer.body and "queue_id" in answer.body[0]:
        return php_json_pretty(answer.body)  # process_get_return()
    return cast(str, php_json_encode(answer.body))


def _route_not_found() -> _Exit:
    return _Exit(404, _error("route not found"))


# --------------------------------------------------------------------------------------------------
# ASGI
# --------------------------------------------------------------------------------------------------


def _cookie_header(session_id: str, now: datetime) -> str:
    expires = (now + timedelta(seconds=SESSION_LIFETIME)).strftime("%a, %d-%b-%Y %H:%M:%S GMT")
    return (
        f"{SESSION_COOKIE}={session_id}; expires={expires}; Max-Age={SESSION_LIFETIME}; path=/; HttpOnly; SameSite=Lax"
    )


def _action_of(rest: str) -> str:
    action, _, rest_of_path = rest.partition("/")
    if action in ("edit", "delete", "get") and rest_of_path.split("/", 1)[0] == "mailq":
        return "mailq"
    return action if action in ("add", "edit", "delete", "get") else "other"


_INTERNAL_ERROR = (
    "<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
    "<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def create_standin_app(keys: list[StandinKey] | None = None, *, now: Callable[[], datetime] | None = None) -> Starlette:
    """The mailcow double as an ASGI app; `app.state.standin` is its `MailcowStandin`."""
    standin = MailcowStandin(keys, now)

    async def api(request: Request) -> Response:
        rest = request.path_params["rest"]
        body = await request.body()
        op = _action_of(rest)
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "op": op,
            "status": None,
            "auth": None,
            "cookie_sent": SESSION_COOKIE in request.cookies,
            "content_type": request.headers.get("content-type"),
            "body": body[:4096].decode("utf-8", errors="replace"),
            "fault": None,
        }
        standin.log_call(record)
        fault = standin._take_fault(op)
        if fault is not None:
            record["fault"] = fault.mode
            delay = fault.delay if fault.delay or fault.mode != "timeout" else 30.0
            if delay > 0:
                await asyncio.sleep(delay)
            if fault.mode == "http500":
                record["status"] = 500
                return Response(_INTERNAL_ERROR, 500, media_type="text/html")
            if fault.mode == "empty":
                record["status"] = 200
                return Response(b"", 200, headers={"content-type": _JSON})
        call = _Call(
            method=request.method,
            rest=rest,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            remote=request.client.host if request.client else "0.0.0.0",  # noqa: S104 - not a bind address
            session_id=request.cookies.get(SESSION_COOKIE),
        )
        outcome = standin.handle(call)
        record["auth"] = outcome.auth
        if fault is not None and fault.mode == "drop_after_commit":
            record["status"] = 500
            return Response(_INTERNAL_ERROR, 500, media_type="text/html")
        record["status"] = outcome.status
        response = Response(
            outcome.body.encode("utf-8"), outcome.status, headers={"content-type": outcome.content_type}
        )
        response.headers.append("set-cookie", _cookie_header(outcome.session_id, standin._now()))
        return response

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            payload = await _json_body(request)
            try:
                fault = Fault(
                    op=str(payload.get("op", "any")),
                    mode=str(payload["mode"]),
                    count=int(payload.get("count", 1)),
                    delay=float(payload.get("delay", 0.0)),
                )
            except (KeyError, TypeError, ValueError):
                return JSONResponse({"error": "need mode, optional op/count/delay"}, 422)
            if fault.op not in FAULT_OPS or fault.mode not in FAULT_MODES or fault.count < 1 or fault.delay < 0:
                return JSONResponse({"error": f"op in {FAULT_OPS}, mode in {FAULT_MODES}, count >= 1"}, 422)
            standin.add_fault(fault)
        elif request.method == "DELETE":
            standin.clear_faults()
        return JSONResponse({"faults": standin.armed_faults()})

    async def reset(request: Request) -> Response:
        standin.reset()
        return JSONResponse({"reset": True})

    async def rows(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(standin.rows())
        payload = await _json_body(request)
        if payload.get("policy", "encrypt") not in POLICY_ENUM:
            return JSONResponse({"error": f"policy must be one of {POLICY_ENUM}"}, 422)
        try:
            row = standin.seed_row(
                str(payload["dest"]),
                str(payload.get("policy", "encrypt")),
                str(payload.get("parameters", "")),
                int(payload.get("active", 1)),
                row_id=int(payload["id"]) if payload.get("id") is not None else None,
                created=payload.get("created"),
                modified=payload.get("modified"),
            )
        except (KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad row: {exc}"}, 422)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 409)
        return JSONResponse(row, 201)

    async def calls(request: Request) -> Response:
        if request.method == "DELETE":
            standin.calls.clear()
        return JSONResponse(standin.calls)

    async def keys_endpoint(request: Request) -> Response:
        payload = await _json_body(request)
        try:
            key = StandinKey(**payload)
        except TypeError as exc:
            return JSONResponse({"error": str(exc)}, 422)
        standin.set_key(key)
        return JSONResponse({"keys": len(standin.keys)})

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/api/v1/{rest:path}", api, methods=methods),
            Route(f"{CONTROL_PREFIX}/faults", faults, methods=["GET", "POST", "DELETE"]),
            Route(f"{CONTROL_PREFIX}/reset", reset, methods=["POST"]),
            Route(f"{CONTROL_PREFIX}/rows", rows, methods=["GET", "POST"]),
            Route(f"{CONTROL_PREFIX}/calls", calls, methods=["GET", "DELETE"]),
            Route(f"{CONTROL_PREFIX}/keys", keys_endpoint, methods=["POST"]),
            *queue_routes(lambda: standin.queue, CONTROL_PREFIX),
        ]
    )
    app.router.redirect_slashes = False
    app.state.standin = standin
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        payload = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def iter_keys(args: argparse.Namespace) -> Iterator[StandinKey]:
    allow = args.allow_from or ["0.0.0.0/0", "::/0"]
    key = args.api_key or os.environ.get("TLSO_STANDIN_API_KEY", "")
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as handle:
            key = handle.read().strip()
    if key:
        yield StandinKey(key=key, access="rw", allow_from=allow)
    if args.read_only_key:
        yield StandinKey(key=args.read_only_key, access="ro", allow_from=allow)


def main(argv: list[str] | None = None) -> None:
    """Serve the double with uvicorn (dev mode, tests in another process)."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m devtools.mailcow_standin", description="TEST DOUBLE of mailcow's tls-policy-map API"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", help="rw key (or TLSO_STANDIN_API_KEY)")
    parser.add_argument("--api-key-file", help="file holding the rw key")
    parser.add_argument("--read-only-key", help="an additional ro key")
    parser.add_argument("--allow-from", action="append", help="CIDR allowed for the keys (repeatable)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    keys = list(iter_keys(args))
    if not keys:
        parser.error("give --api-key, --api-key-file or TLSO_STANDIN_API_KEY")
    uvicorn.run(create_standin_app(keys), host=args.host, port=args.port, log_level=args.log_level, ws="none")


if __name__ == "__main__":
    main()
