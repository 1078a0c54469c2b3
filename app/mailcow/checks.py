"""What the client refuses before sending, because mailcow would answer it uninformatively (an empty
body, a silent no-op): row ids, policies, parameters, an edit's dest, and queue ids (§12: ids that are
not hex are dropped without a word, and the answer still says success)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from app.mailcow.policies import POLICIES

MAX_COLUMN: Final = 255
_QUEUE_ID = re.compile(r"[0-9A-F]+")


def check_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a mailcow row id is a positive int")
    return value


def check_policy(policy: Any) -> str:
    if not isinstance(policy, str) or policy.strip().lower() not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
    return policy.strip().lower()


def check_parameters(parameters: Any) -> str:
    if not isinstance(parameters, str):
        raise ValueError("parameters must be a string")
    if len(parameters) > MAX_COLUMN:
        raise ValueError(f"parameters are {len(parameters)} characters long; mailcow stores at most {MAX_COLUMN}")
    if parameters == "0":
        raise ValueError('mailcow treats parameters "0" as empty and skips its check')
    return parameters


def check_edit_dest(dest: Any) -> str:
    # add normalises dest (trim, lowercase, punycode); edit stores it verbatim and ignores "" and "0"
    if not isinstance(dest, str) or dest in ("", "0"):
        raise ValueError('dest must be a non-empty string other than "0"')
    if dest != dest.strip() or dest != dest.lower() or not dest.isascii():
        raise ValueError("edit stores dest verbatim: pass it trimmed, lower-case and in punycode")
    if len(dest) > MAX_COLUMN:
        raise ValueError(f"dest is longer than {MAX_COLUMN} characters")
    return dest


def check_queue_ids(ids: Iterable[Any]) -> list[str]:
    """Postfix queue ids as mailcow's deliver wants them: strings of hex digits, upper-case (as Postfix
    names its queue files), each once; anything else refuses the whole call before it is sent."""
    if isinstance(ids, str | bytes):
        raise ValueError("queue ids are a list of strings, not one string")
    checked: dict[str, None] = {}
    for value in ids:
        if not isinstance(value, str) or _QUEUE_ID.fullmatch(value.upper()) is None:
            # a JSON number gets a danger answer, anything else not hex is dropped silently (§12)
            raise ValueError("a mailcow queue id is a string of hex digits")
        checked[value.upper()] = None
    return list(checked)
