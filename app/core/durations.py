"""ISO 8601 durations, strictly: only the units that have one length.

`PnW`, or `PnD`, `PTnH`, `PTnM`, `PTnS` and their combinations (`P1DT12H`), whole numbers only. Months
and years are refused (a month is 28 to 31 days, a year 365 or 366: an override must not last a day more
or less than the reviewer read), and so is a `T` with nothing after it (`P1DT` is not ISO 8601). Weeks are
exactly seven days; ISO 8601-1 writes them alone (`P2W`), never next to other units. Designators may be
lower case (RFC 3339's grammar is case-insensitive).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_N = "[0-9]+"  # ASCII digits only, as in the JSON Schema pattern (Python's \d also takes other scripts')
_TIME = rf"[Tt](?:{_N}[Hh](?:{_N}[Mm])?(?:{_N}[Ss])?|{_N}[Mm](?:{_N}[Ss])?|{_N}[Ss])"
# Everything accepted, and nothing else: the OpenAPI document carries this pattern.
PATTERN = rf"^[Pp](?:{_N}[Ww]|{_N}[Dd](?:{_TIME})?|{_TIME})$"
_ACCEPTED = re.compile(PATTERN)
_PART = re.compile(r"([0-9]+)([WDHMS])")
_LOOSE = re.compile(r"[Pp](?P<date>(?:[0-9.,]+[A-Za-z])*)(?P<time>[Tt](?:[0-9.,]+[A-Za-z])*)?")

EXAMPLES = "P3D, PT12H, P1DT6H or P2W"
DESCRIPTION = (
    f"An ISO 8601 duration such as {EXAMPLES}: whole days, hours, minutes and seconds, or weeks alone. "
    "Months and years are refused (their length varies)."
)


def _why_not(text: str) -> str:
    """The reason `text` is refused, as precisely as its shape allows."""
    if text.startswith("-"):
        return "cannot be negative"
    loose = _LOOSE.fullmatch(text)
    if loose is None:
        return f"must be an ISO 8601 duration such as {EXAMPLES}"
    date, time = loose["date"], loose["time"] or ""
    if re.search(r"[Yy]|[Mm]", date):
        return "months and years have no fixed length: give days (e.g. P30D) or weeks (P4W)"
    if time.upper() == "T":
        return "a 'T' must be followed by hours, minutes or seconds (P1DT12H); for whole days write P1D"
    if re.search(r"[.,]", text):
        return "must use whole numbers: PT90M rather than PT1.5H"
    if re.search(r"[Ww]", date):
        return "weeks stand alone (P2W): for two weeks and three days write P17D"
    if not date and not time:
        return "names no length: write e.g. P3D"
    return f"must be an ISO 8601 duration such as {EXAMPLES}, each unit once and in order"


def parse_duration(value: Any) -> timedelta:
    """The length `value` (an ISO 8601 duration string) stands for; ValueError says why not."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 duration string such as {EXAMPLES}")
    if not _ACCEPTED.fullmatch(value):
        raise ValueError(_why_not(value))
    date, _, time = value.upper().partition("T")
    days = {unit: int(number) for number, unit in _PART.findall(date)}
    clock = {unit: int(number) for number, unit in _PART.findall(time)}
    try:
        return timedelta(
            weeks=days.get("W", 0),
            days=days.get("D", 0),
            hours=clock.get("H", 0),
            minutes=clock.get("M", 0),
            seconds=clock.get("S", 0),
        )
    except OverflowError as exc:
        raise ValueError("is longer than any duration this service can hold") from exc


# The API's duration fields: validated by `parse_duration`, documented by its pattern.
IsoDuration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "pattern": PATTERN, "examples": ["P3D", "PT12H", "P2W"]}),
]
