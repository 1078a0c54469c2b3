"""The TLS policies a row of mailcow's policy map can name: Postfix's security levels, in the order of
the column's ENUM, mailcow's only check on it (mailcow-api.md §2). Spelled here once: the API's request
schema, the client's checks, the Postfix grammar and the diagnosis all use these."""

from __future__ import annotations

from typing import Literal, get_args

TlsPolicy = Literal["none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"]
POLICIES: tuple[TlsPolicy, ...] = get_args(TlsPolicy)
