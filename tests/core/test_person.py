"""The person key (app/core/person.py): every spelling of one name is one person, and the self-approval
check sees through all of them. Property tests generate names and their case, compatibility and
confusable variants; explicit cases pin the names the security review used."""

# ruff: noqa: RUF001, RUF002, RUF003 (look-alike characters are what this file is about)

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.auth import Principal
from app.core.person import is_reserved, person_key, same_person
from app.core.text import is_default_ignorable
from app.overrides.models import Override, OverrideState
from app.overrides.permissions import asked_for_it

Draw = Callable[..., object]

# Letters and digits of every script, joined by single spaces: what a name is made of.
WORDS = st.text(st.characters(categories=("Lu", "Ll", "Lt", "Lo", "Nd")), min_size=1, max_size=10)
NAMES = st.lists(WORDS, min_size=1, max_size=3).map(" ".join).filter(person_key)

INVISIBLE = [chr(c) for c in range(0x110000) if is_default_ignorable(chr(c)) and unicodedata.category(chr(c)) != "Cn"]
# Not U+0345, the Greek iota subscript: a later case mapping turns a stray one into the letter Ι, another
# name to see (its own cases are below).
MARKS = ["\u0301", "\u0300", "\u0308", "\u0307", "\u030c", "\u0323", "\u0336", "\u0338", "\u20dd"]


def _fullwidth(name: str) -> str:
    return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else "\u3000" if ch == " " else ch for ch in name)


def _bold(name: str) -> str:  # MATHEMATICAL BOLD letters and digits
    def one(ch: str) -> str:
        if "A" <= ch <= "Z":
            return chr(0x1D400 + ord(ch) - ord("A"))
        if "a" <= ch <= "z":
            return chr(0x1D41A + ord(ch) - ord("a"))
        if "0" <= ch <= "9":
            return chr(0x1D7CE + ord(ch) - ord("0"))
        return ch

    return "".join(one(ch) for ch in name)


def _ligatures(name: str) -> str:
    return name.replace("ffi", "\ufb03").replace("fi", "\ufb01").replace("fl", "\ufb02").replace("ff", "\ufb00")


def _turkish_upper(name: str) -> str:  # what a Turkish locale makes of `i`
    return name.replace("i", "İ").upper()


def _insert(name: str, draw: Draw, alphabet: list[str]) -> str:
    at = draw(st.integers(0, len(name)))
    return name[:at] + str(draw(st.sampled_from(alphabet))) + name[at:]


VARIANTS: dict[str, Callable[[str, Draw], str]] = {
    "upper": lambda n, d: n.upper(),
    "lower": lambda n, d: n.lower(),
    "title": lambda n, d: n.title(),
    "swapcase": lambda n, d: n.swapcase(),
    "turkish upper": lambda n, d: _turkish_upper(n),
    "dotless i": lambda n, d: n.replace("i", "ı").replace("I", "ı"),
    "NFC": lambda n, d: unicodedata.normalize("NFC", n),
    "NFD": lambda n, d: unicodedata.normalize("NFD", n),
    "NFKC": lambda n, d: unicodedata.normalize("NFKC", n),
    "fullwidth": lambda n, d: _fullwidth(n),
    "mathematical bold": lambda n, d: _bold(n),
    "ligatures": lambda n, d: _ligatures(n),
    "an invisible character": lambda n, d: _insert(n, d, INVISIBLE),
    "a combining mark": lambda n, d: _insert(n, d, MARKS),
    "surrounding blanks": lambda n, d: " \u00a0" + n + "\u2003 ",
    "other spaces": lambda n, d: n.replace(" ", str(d(st.sampled_from([" \u00a0", "\u3000", "  ", "\u2009"])))),
}


@st.composite
def name_and_variant(draw: Draw) -> tuple[str, str, list[str]]:
    name = str(draw(NAMES))
    steps = draw(st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=4))
    variant = name
    for step in steps:
        variant = VARIANTS[str(step)](variant, draw)
    return name, variant, [str(step) for step in steps]


def _override(requested_by: str) -> Override:
    """A request as create_override records it (the key beside the name)."""
    return Override(
        requested_by=requested_by,
        requested_by_key=Principal(actor=requested_by, name=requested_by, roles=frozenset()).key,
        state=OverrideState.pending,
    )


def _caller(actor: str) -> Principal:
    return Principal(actor=actor, name=actor, roles=frozenset({"approver"}))


@settings(max_examples=1000, deadline=None)
@given(name_and_variant())
def test_every_variant_is_the_same_person_both_ways(case: tuple[str, str, list[str]]) -> None:
    name, variant, _ = case
    assert same_person(name, variant) and same_person(variant, name)


@settings(max_examples=1000, deadline=None)
@given(name_and_variant())
def test_no_variant_passes_the_self_approval_check(case: tuple[str, str, list[str]]) -> None:
    name, variant, _ = case
    assert asked_for_it(_caller(variant), _override(name))  # asked as `name`, deciding as the variant
    assert asked_for_it(_caller(name), _override(variant))  # and the other way round


@given(st.sampled_from(sorted(VARIANTS)), st.data())
def test_every_variant_of_system_is_reserved(step: str, data: st.DataObject) -> None:
    assert is_reserved(VARIANTS[step]("system", data.draw))


@settings(max_examples=1000)
@given(st.text())
def test_the_key_is_its_own_key(text: str) -> None:
    key = person_key(text)
    assert person_key(key) == key
    assert not any(is_default_ignorable(ch) or unicodedata.category(ch) in ("Mn", "Me") for ch in key)


@settings(max_examples=1000)
@given(st.text().filter(lambda text: "\u0345" not in text))  # the old form made a stray one the letter ι
def test_names_stored_in_the_old_normal_form_keep_their_key(text: str) -> None:
    """Before person keys, delegated names were stored as NFKC + strip + casefold; the migration keys them."""
    old = unicodedata.normalize("NFKC", text).strip().casefold()
    assert person_key(old) == person_key(text)


@given(st.text("abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1), st.text("abcdefghijklmnopqrstuvwxyz"))
def test_different_plain_names_stay_different_people(a: str, b: str) -> None:
    assert same_person(a, b) == (a == b)


SAME = [
    ("josé", "jose\u0301"),  # decomposed
    ("josé", "JOSÉ"),
    ("josé", "Ｊｏｓé"),  # fullwidth
    ("josé", "jose"),  # accents dropped by an ASCII-only directory
    ("Zoë", "zoe\u0308"),
    ("Zoë", "ZOË"),
    ("müller", "MÜLLER"),
    ("müller", "mu\u0308ller"),
    ("ALİCE", "alice"),  # a Turkish locale's upper case of alice
    ("alıce", "alice"),  # and its dotless lower case
    ("alice", "al\u200bice"),  # zero-width space
    ("alice", "\u202ealice\u202c"),  # bidi override
    ("alice", "alice\u2066"),  # bidi isolate
    ("alice", "al\u00adice"),  # soft hyphen
    ("alice", "alice\ufe0f"),  # variation selector
    ("alice", "alice\U000e0041"),  # tag character
    ("fiona", "\ufb01ona"),  # ligature
    ("straße", "STRASSE"),
    ("ann smith", " Ann\u00a0\u00a0Smith "),
    ("system", "ｓｙｓｔｅｍ"),
    ("system", " system"),
    ("a\u0336lice", "alice"),  # strike-through overlay
    ("alice\u0345", "alice"),  # a stray iota subscript is a mark like any other
    ("\u1fb3", "\u0391\u0399"),  # alpha with iota subscript, and its upper case
    ("\u1fb3", "\u1fbc"),  # and its title case
]
DIFFERENT = [("alice", "alicia"), ("bob", "rob"), ("alice", "аlice"), ("jo", "jö o"), ("søren", "soren")]


@pytest.mark.parametrize(("a", "b"), SAME)
def test_same_person(a: str, b: str) -> None:
    assert same_person(a, b) and same_person(b, a)


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_different_people(a: str, b: str) -> None:
    """Only spelling is folded: other letters (a Cyrillic `а`, a stroked `ø`) are other names."""
    assert not same_person(a, b)


def test_nobody_is_the_same_as_a_missing_name() -> None:
    assert not same_person(None, None) and not same_person("alice", None)
