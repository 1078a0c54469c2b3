"""Shared input shapes: text without control or invisible characters, bounded ids, opaque cursors, and
the encoding of identity headers.

PostgreSQL refuses a NUL in text, a lone surrogate (not UTF-8) and a number beyond its column; all must
be a 422 that names the field, never a 500 from the database. Invisible characters are refused too: a
justification of zero-width spaces would pass a length check, and bidi overrides make what a reviewer
sees differ from what is stored ("Trojan Source").
"""

from __future__ import annotations

import base64
import re
import unicodedata
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator

from app.core.errors import InvalidInput

MAX_ID = 2**31 - 1  # the id columns are 32-bit integers on PostgreSQL

# C0, DEL and C1: none is text. Free text may keep its line breaks and tabs.
_CONTROL = frozenset(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])
_LINE_BREAKS_AND_TABS = frozenset({"\t", "\n", "\r"})
_LINE_SEPARATORS = frozenset({"\u2028", "\u2029"})

# Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt; Python has no accessor):
# characters that render as nothing.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian variation selectors and vowel separator
    (0x200B, 0x200F),  # zero width space, ZWNJ, ZWJ, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates, deprecated format characters
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero width no-break space (BOM)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),  # unassigned
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol format controls
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement, unassigned
)
# Invisible characters that written language needs, kept in text (but never counted as visible, and
# ignored when people are compared): ZWNJ and ZWJ (Persian, Indic scripts, emoji sequences), the
# directional marks LRM, RLM and ALM (they cannot reorder text, unlike embeddings, overrides and
# isolates), and variation selectors (emoji and CJK glyph variants, Mongolian).
_NEEDED_INVISIBLE = frozenset(
    {
        "\u200c",
        "\u200d",
        "\u200e",
        "\u200f",
        "\u061c",
        *(chr(c) for c in range(0xFE00, 0xFE10)),
        *(chr(c) for c in [0x180B, 0x180C, 0x180D, 0x180F]),
        *(chr(c) for c in range(0xE0100, 0xE01F0)),
    }
)


_IGNORABLE_CLASS = "".join(f"{chr(low)}-{chr(high)}" for low, high in _DEFAULT_IGNORABLE)
_IGNORABLE = re.compile(f"[{_IGNORABLE_CLASS}]")
# Every character `text_problem` may object to (the needed invisible ones too): text without any of them,
# which is nearly all text, is accepted by one regex search instead of a look at each character.
_SUSPECT_TEXT = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff{_IGNORABLE_CLASS}]")
_SUSPECT_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff{_IGNORABLE_CLASS}]")


def is_default_ignorable(ch: str) -> bool:
    return _IGNORABLE.match(ch) is not None


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".rstrip()


def text_problem(value: str, *, one_line: bool) -> str | None:
    """Why `value` is not acceptable text (or None): control characters, lone surrogates, invisible
    characters other than those written language needs, and for one line also line separators."""
    if (_SUSPECT_LINE if one_line else _SUSPECT_TEXT).search(value) is None:
        return None
    for ch in value:
        if ch in _CONTROL and (one_line or ch not in _LINE_BREAKS_AND_TABS):
            if one_line:
                return f"must be one line without control characters ({_describe(ch)})"
            return f"must not contain control characters ({_describe(ch)})"
        if one_line and ch in _LINE_SEPARATORS:
            return f"must be one line ({_describe(ch)})"
        if "\ud800" <= ch <= "\udfff":
            return f"must be valid Unicode (a lone surrogate U+{ord(ch):04X})"
        if is_default_ignorable(ch) and ch not in _NEEDED_INVISIBLE:
            return f"must not contain invisible characters ({_describe(ch)})"
    return None


def visible_length(value: str) -> int:
    """Characters that show: surrounding whitespace and invisible characters do not count."""
    shown = value.strip()
    if _IGNORABLE.search(shown) is None:
        return len(shown)
    return sum(1 for ch in shown if not is_default_ignorable(ch))


def _text(value: str) -> str:
    problem = text_problem(value, one_line=False)
    if problem:
        raise ValueError(problem)
    return value


def _line(value: str) -> str:
    problem = text_problem(value, one_line=True)
    if problem:
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(_text)]  # free text: line breaks and tabs allowed
Line = Annotated[str, AfterValidator(_line)]  # one line (names, tickets)

# A query filter: one line, bounded.
Filter = Annotated[Line | None, Query(max_length=200)]


def parse_id(value: str) -> int | None:
    """A path segment as a row id, or None: ASCII digits only (`²` and `①` are digits to `str.isdigit`
    but not to `int`) and within the id columns' range."""
    if not re.fullmatch(r"[0-9]{1,10}", value):
        return None
    number = int(value)
    return number if 1 <= number <= MAX_ID else None


# Identity headers (X-On-Behalf-Of, X-On-Behalf-Of-Name) carry UTF-8. HTTP gives header values as bytes
# (Starlette hands them on decoded as Latin-1, which turns a UTF-8 `josé` into `josÃ©`), so the value is
# read as: the bytes, with every `%XX` replaced by the byte it names (RFC 3986 percent-encoding), must be
# UTF-8. Sending ASCII with non-ASCII percent-encoded (`jos%C3%A9`) is the portable form; raw UTF-8 bytes
# are accepted as well. A `%` not followed by two hex digits, or bytes that are not UTF-8, are refused.
HEADER_ENCODING = (
    "UTF-8. Send non-ASCII characters percent-encoded (RFC 3986: `jos%C3%A9` for `josé`, `%25` for a "
    "literal `%`); raw UTF-8 bytes are accepted too. After percent-decoding the value must be valid UTF-8, "
    "one line, without control or invisible characters (zero-width spaces, bidi controls), and the header "
    "is sent once; else 422."
)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def decode_header_text(value: str) -> str:
    """The text an identity header carries (see HEADER_ENCODING); ValueError says what is wrong."""
    raw = value.encode("latin-1")  # undoes Starlette's decoding: one byte per character, exactly
    if b"%" in _PERCENT.sub(b"", raw):
        raise ValueError("has a '%' that is not followed by two hex digits (send a literal '%' as %25)")
    try:
        text = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("is not UTF-8 (percent-encode non-ASCII characters: jos%C3%A9 for josé)") from exc
    problem = text_problem(text, one_line=True)
    if problem:
        raise ValueError(problem)
    return text


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
