"""app.mailcow.dest: where mailcow's add puts a name, and both forms of a name with an IDNA deviation character."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from app.mailcow.dest import add_form, dest_forms, deviations_in, transitional_form, unicode_form
from app.overrides.postfix import normalise_destination
from devtools.mailcow_standin import idn_to_ascii
from tests.standin import mailcow_client, make_app

DEVIATING = [
    "straße.example",
    "Straße.Example",
    "größe.example",
    "faß.de",
    "a\u03c2.example",
    "\u03c3\u03b1\u03c2.example",
    "\u0915\u094d\u200d\u0937.example",
    "\u0915\u094d\u200c\u0937.example",
    "[mx.straße.example]:25",
]
PLAIN = ["example.org", "bücher.example", "xn--bcher-kva.example", "[mx.example.org]:25", "[192.0.2.1]:25"]


@pytest.mark.parametrize("typed", DEVIATING)
def test_the_transitional_form_is_where_mailcows_add_puts_the_name(typed: str) -> None:
    ours = normalise_destination(typed)
    stored_by_mailcow = idn_to_ascii(typed.strip())  # the stand-in, as mailcow-api.md §3 describes
    assert deviations_in(ours)
    assert transitional_form(ours) == stored_by_mailcow != ours
    assert dest_forms(ours) == (ours, stored_by_mailcow)
    assert add_form(typed) == stored_by_mailcow
    assert normalise_destination(unicode_form(ours)) == ours


@pytest.mark.parametrize("typed", PLAIN)
def test_a_name_without_deviation_characters_has_one_form(typed: str) -> None:
    ours = normalise_destination(typed)
    assert deviations_in(ours) == [] and transitional_form(ours) is None
    assert dest_forms(ours) == (ours,)


def test_an_a_label_sent_to_add_is_kept() -> None:
    assert add_form("xn--strae-oqa.example") == "xn--strae-oqa.example"
    assert add_form("  Example.ORG ") == "example.org"


async def test_find_policy_finds_what_add_made_of_a_unicode_dest() -> None:
    app: Starlette = make_app()
    async with mailcow_client(app) as client:
        await client.add_policy("straße.example", "encrypt")  # stored as strasse.example
        found = await client.find_policy("straße.example")
    assert found is not None and found.dest == "strasse.example"
