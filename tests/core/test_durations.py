"""ISO 8601 durations as the API and the settings read them: only units of one fixed length."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from pydantic import ValidationError

from app.core.durations import PATTERN, parse_duration
from tests.helpers import make_settings

ACCEPTED = {
    "P3D": timedelta(days=3),
    "PT12H": timedelta(hours=12),
    "P1DT6H": timedelta(days=1, hours=6),
    "P1DT1M": timedelta(days=1, minutes=1),  # M after T: minutes
    "PT1H30M15S": timedelta(hours=1, minutes=30, seconds=15),
    "PT45S": timedelta(seconds=45),
    "P2W": timedelta(days=14),
    "p3d": timedelta(days=3),
    "P0D": timedelta(0),  # a valid duration; the override rules refuse it as too short
}
REFUSED = {
    "P1M": "months and years",
    "P1Y": "months and years",
    "P1Y2M3DT4H": "months and years",
    "P1MT1H": "months and years",
    "P1DT": "a 'T' must be followed",
    "PT": "a 'T' must be followed",
    "P": "names no length",
    "P1W2D": "weeks stand alone",
    "P1WT1H": "weeks stand alone",
    "PT1.5H": "whole numbers",
    "PT0,5H": "whole numbers",
    "-P1D": "negative",
    "P1D2D": "each unit once and in order",
    "PT1S1H": "each unit once and in order",
    "P\u0663D": "ISO 8601 duration",  # ARABIC-INDIC DIGIT THREE: a digit to Python, not to ISO 8601
    " P3D": "ISO 8601 duration",
    "three days": "ISO 8601 duration",
    "P99999999999D": "longer than any duration",
}


@pytest.mark.parametrize(("text", "length"), ACCEPTED.items())
def test_accepted(text: str, length: timedelta) -> None:
    assert parse_duration(text) == length
    assert re.fullmatch(PATTERN, text)  # the documented pattern says the same


@pytest.mark.parametrize(("text", "words"), REFUSED.items())
def test_refused_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_duration(text)
    if text != "P99999999999D":  # well-formed, only too long: the pattern cannot know
        assert not re.fullmatch(PATTERN, text, re.ASCII)


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="string"):
        parse_duration(86400)


@pytest.mark.parametrize(
    ("text", "length"), [("P30D", timedelta(days=30)), ("P2W", timedelta(days=14)), ("3600", timedelta(hours=1))]
)
def test_settings_take_iso_durations_and_seconds(text: str, length: timedelta) -> None:
    assert make_settings(max_duration=text, default_duration="PT1H").max_duration == length


@pytest.mark.parametrize("text", ["P1M", "P1DT", "P1Y"])
def test_settings_refuse_what_the_api_refuses(text: str) -> None:
    with pytest.raises(ValidationError, match="max_duration"):
        make_settings(max_duration=text, default_duration="PT1H")
