"""Who is the same person: one key for every comparison of people.

A person reaches tlsoverride under a token's `sub` or under the name an integration gives in
`X-On-Behalf-Of`, and directories, chat tools and identity providers spell one name differently: `ALİCE`
from a Turkish locale, `Ｊｏｓé` from a fullwidth input method, `jose` + U+0301 decomposed, a zero-width
space pasted along. Every place that asks "is this the same person?" (the self-approval rule, one vote
per reviewer, the reserved name `system`, the caller's own overrides, the `requester` filter, rate limits,
idempotency records) compares `person_key`s, and the key is stored beside each recorded name so that SQL
compares it too. The name as given stays what is shown.

The key: compatibility decomposition (NFKD: fullwidth forms, ligatures, superscripts, styled letters),
full case folding, then combining marks and default-ignorable characters dropped, the dotless i and j
(U+0131, U+0237) folded to i and j (their dot is a combining mark elsewhere: `İ` folds to `i` + U+0307),
whitespace collapsed, and the rest recomposed (NFC).

Marks are dropped, not kept: one person's name loses its accents in some systems (`José` → `Jose`), and a
mark can be added to any letter to make a name that looks the same. The price: two accounts whose names
differ only in accents, case, width or invisible characters are one person here, so they may not approve
each other's requests and they see each other's. Identity providers do not issue such look-alikes to
different people, and a refusal is safe where a missed match is a self-approval. Cross-script homoglyphs
(Cyrillic U+0430 for a Latin `a`) are not folded: they are different letters, which no honest source
mixes up, and an integration that invents names can name anyone anyway.

Changing this function changes stored keys: it needs a migration that recomputes them.
"""

from __future__ import annotations

import unicodedata

from app.core.text import is_default_ignorable

# Letters that are their dotted counterpart without the dot: once marks are dropped, the same letter.
_DOTLESS = str.maketrans({"\u0131": "i", "\u0237": "j"})

_IOTA_SUBSCRIPT = "\u0345"
_TAKES_IOTA_SUBSCRIPT = frozenset("\u03b1\u03b7\u03c9\u0391\u0397\u03a9")  # alpha, eta, omega

RESERVED_KEYS = frozenset({"system"})  # the worker's name in the audit trail


def person_key(name: str) -> str:
    """The canonical form under which two names are the same person."""
    key = name
    for _ in range(4):  # case folding can produce what decomposes further; a fixed point in 2 rounds
        letters = _letters(unicodedata.normalize("NFKD", key)).casefold()
        letters = _letters(unicodedata.normalize("NFKD", letters)).translate(_DOTLESS)
        done = unicodedata.normalize("NFC", " ".join(letters.split()))
        if done == key:
            break
        key = done
    return key


def _letters(text: str) -> str:
    """`text` (decomposed) without combining marks and invisible characters. The Greek iota subscript
    is a mark that case folding turns into the letter it stands for (alpha with it upper-cases to
    capital alpha, capital iota), so under
    the vowels that take it, it stays that letter; anywhere else it is a mark like any other."""
    kept: list[str] = []
    base = ""
    for ch in text:
        if unicodedata.category(ch) in ("Mn", "Me") or is_default_ignorable(ch):
            if ch == _IOTA_SUBSCRIPT and base in _TAKES_IOTA_SUBSCRIPT:
                kept.append("\u03b9")
            continue
        kept.append(ch)
        base = ch
    return "".join(kept)


def same_person(a: str | None, b: str | None) -> bool:
    """Whether two names are the same person (never for a missing name)."""
    return a is not None and b is not None and person_key(a) == person_key(b)


def is_reserved(name: str) -> bool:
    return person_key(name) in RESERVED_KEYS
