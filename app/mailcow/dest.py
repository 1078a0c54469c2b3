"""How mailcow compares and stores a row's `dest` (mailcow-api.md §2, §3): pure functions, no I/O.

* The unique index (utf8mb4_general_ci) ignores case and trailing spaces: `dest_key`.
* add trims `dest` and converts it with PHP's `idn_to_ascii()` in its default mode, UTS #46
  **transitional** processing: the four deviation characters are mapped as IDNA2003 did (ß → ss,
  ς → U+03C3, ZWJ and ZWNJ dropped), so `straße.example` typed into mailcow's UI is stored as
  `strasse.example`; an A-label sent as such (`xn--strae-oqa.example`) is stored unchanged: `add_form`.
* tlsoverride stores IDNA2008 A-labels (app/overrides/postfix.py), so a hand-made row for a name with a
  deviation character sits under a different dest than ours: `dest_forms` gives both, for conflicts.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata

from idna.core import IDNAError, uts46_remap

# The characters IDNA2003 (UTS #46 transitional) and IDNA2008 treat differently.
DEVIATIONS = {"\u00df": "ss", "\u03c2": "\u03c3", "\u200c": "", "\u200d": ""}
DEVIATION_NAMES = {
    "\u00df": "ß (sharp s)",
    "\u03c2": "ς (final sigma)",
    "\u200c": "U+200C (zero width non-joiner)",
    "\u200d": "U+200D (zero width joiner)",
}
_TRIM = " \t\n\r\0\x0b"  # PHP's trim()
# An A-label, possibly inside `[host]:port`, the form a next hop takes.
_A_LABEL = re.compile(r"(\[?)(xn--[a-z0-9-]+)(\]?(?::[0-9]+)?)", re.IGNORECASE)


def dest_key(text: str) -> str:
    """How mailcow compares `dest` (utf8mb4_general_ci, the unique index): case and trailing spaces ignored."""
    return text.rstrip(" ").lower()


def add_form(dest: str) -> str | None:
    """What mailcow's add stores for `dest` (trim, UTS #46 ToASCII, transitional); None if add refuses it."""
    name = dest.strip(_TRIM)
    if name.isascii():
        return name.lower() or None
    try:
        mapped = uts46_remap(name, std3_rules=False)
    except (IDNAError, UnicodeError, IndexError):
        return None
    mapped = unicodedata.normalize("NFC", "".join(DEVIATIONS.get(ch, ch) for ch in mapped))
    labels = []
    for label in mapped.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
        except UnicodeError:
            return None
    return ".".join(labels)


def unicode_form(destination: str) -> str:
    """`destination` with its A-labels decoded (what a human would type into mailcow's UI)."""
    labels = []
    for label in destination.split("."):
        match = _A_LABEL.fullmatch(label)
        if match is not None:
            with contextlib.suppress(UnicodeError):
                label = match.group(1) + match.group(2)[4:].lower().encode("ascii").decode("punycode") + match.group(3)
        labels.append(label)
    return ".".join(labels)


def deviations_in(destination: str) -> list[str]:
    """The deviation characters in `destination` (A-labels decoded), each once, in order."""
    return list(dict.fromkeys(ch for ch in unicode_form(destination) if ch in DEVIATIONS))


def transitional_form(destination: str) -> str | None:
    """Where mailcow's add puts a row typed as `destination`'s Unicode form, when that differs from
    `destination` (it has a deviation character); else None."""
    if not deviations_in(destination):
        return None
    stored = add_form(unicode_form(destination))
    return stored if stored is not None and dest_key(stored) != dest_key(destination) else None


def dest_forms(destination: str) -> tuple[str, ...]:
    """The dest keys a row for `destination` may have in mailcow: ours first, then the transitional one."""
    other = transitional_form(destination)
    return (dest_key(destination),) if other is None else (dest_key(destination), dest_key(other))


def lookup_candidates(dest: str) -> set[str]:
    """The dest keys under which a row added with `dest` can be found (exactly `dest`, or what add made of it)."""
    wanted = dest.strip(_TRIM)
    keys = {dest_key(wanted)}
    stored = add_form(wanted)
    if stored is not None:
        keys.add(dest_key(stored))
    return keys
