"""Shared input shapes: text without control characters, bounded ids, opaque cursors.

PostgreSQL refuses a NUL in text and a number beyond its column; both must be a 422 that names the
field, never a 500 from the database.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator

from app.core.errors import InvalidInput

MAX_ID = 2**31 - 1  # the id columns are 32-bit integers on PostgreSQL

_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}
_LINE_BREAKS_AND_TABS = {"\t", "\n", "\r"}


def _text(value: str) -> str:
    if any(ch in _CONTROL and ch not in _LINE_BREAKS_AND_TABS for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _line(value: str) -> str:
    if any(ch in _CONTROL for ch in value):
        raise ValueError("must be one line without control characters")
    return value


Text = Annotated[str, AfterValidator(_text)]  # free text: line breaks and tabs allowed
Line = Annotated[str, AfterValidator(_line)]  # one line (names, tickets)

# A query filter: one line, bounded.
Filter = Annotated[Line | None, Query(max_length=200)]


def encode_cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> int | None:
    """The position an opaque cursor of `kind` stands for; anything else is a 422 on `query.cursor`."""
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        found, _, value = text.partition(":")
        position = int(value)
        if found != kind or not 0 <= position <= 2**63 - 1:
            raise ValueError(found)
        return position
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput.on("query.cursor", "is not a cursor this API handed out") from exc
