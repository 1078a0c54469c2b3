"""A compact list page from encoded briefs kept between requests (PostgreSQL).

A reviewer's dashboard asks for the same page again and again, and the items on it rarely change; encoding
fifty briefs (`reads.brief_fields`, then JSON) is most of a page's time. So each item's JSON is kept, keyed
by what the database says about the row it was made from:

* the row version: the id and `xmin`, the transaction that wrote this version of the override's row. Any
  UPDATE writes a new version with a new `xmin` (transaction ids are never reused within a cluster short
  of wrap-around, 2^32 transactions); an update in the same transaction that wrote it is not visible to
  anyone else before that transaction ends;
* its votes: how many and the last one's id (votes are only ever inserted; a new vote has a higher id);
* `overdue`, the one field computed from the clock.

A page is then one light statement (the page's ids and those keys, `reads.with_stamps`) and, only for
items not kept, one statement for those items in full. Everything on the page is as of the light
statement: an item read in full must have the key the light statement gave it, else the page is read
again the reference way (`None` here), so a page never mixes two moments. The bytes are those of
`reads.brief_page_json` (tests/overrides/test_briefs.py).

Per process, bounded (`TLSO_BRIEF_CACHE_SIZE` items, ~1-2 KB each; 0 turns it off). The keys name rows of
one PostgreSQL cluster: an API process pointed at a database restored into another cluster (other
transaction ids) should be restarted."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from pydantic_core import to_json
from sqlalchemy import Select

from app.core.db import AsyncReads, utcnow
from app.core.text import encode_cursor
from app.overrides.lifecycle import is_overdue
from app.overrides.reads import BY_IDS_WITH_VOTES, Answered, VoteFields, brief_fields, grouped

Key = tuple[int, str, int, int | None, bool]  # id, xmin, votes, last vote id, overdue

# More items to encode than this on one page: in the thread pool, not blocking every request meanwhile.
_ENCODE_ON_LOOP = 50


class BriefCache:
    """Encoded briefs by `Key`, at most `size` (the oldest kept is dropped first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: dict[Key, bytes] = {}

    def get(self, key: Key) -> bytes | None:
        return self._kept.get(key)

    def put(self, key: Key, encoded: bytes) -> None:
        if len(self._kept) >= self.size:
            del self._kept[next(iter(self._kept))]
        self._kept[key] = encoded

    def __len__(self) -> int:
        return len(self._kept)


def kept_briefs(state: Any) -> BriefCache | None:
    """The API process's cache, on the app's `state`: made on first use, and anew when the app's engine is
    another (another database); None when `TLSO_BRIEF_CACHE_SIZE` is 0."""
    size: int = state.settings.brief_cache_size
    if not size:
        return None
    made: tuple[Any, BriefCache] | None = getattr(state, "tlso_brief_cache", None)
    if made is None or made[0] is not state.engine:
        made = state.tlso_brief_cache = (state.engine, BriefCache(size))
    return made[1]


async def brief_page(
    db: AsyncReads, cache: BriefCache, stamps: Select[Any], params: dict[str, Any], limit: int
) -> bytes | None:
    """The page of briefs `stamps` (a `reads.with_stamps` statement, `limit + 1` rows) selects, as
    `brief_page_json` encodes it; None if an item changed between the two statements."""
    rows = await db.rows(stamps, params)
    now = utcnow()
    keys: list[Key] = [(r.id, r.rev, r.votes, r.last_vote, is_overdue(r, now)) for r in rows[:limit]]
    items = [cache.get(key) for key in keys]
    missing = {key[0]: key for key, item in zip(keys, items, strict=True) if item is None}
    if missing:
        read = await db.rows(BY_IDS_WITH_VOTES, {"ids": list(missing)})
        made = (
            await anyio.to_thread.run_sync(_encoded, read, missing, now)
            if len(missing) > _ENCODE_ON_LOOP
            else _encoded(read, missing, now)
        )
        if made is None:
            return None
        for key, item in made.items():
            cache.put(key, item)
        items = [made[key] if item is None else item for key, item in zip(keys, items, strict=True)]
    next_cursor = encode_cursor("o", rows[limit - 1].id) if len(rows) > limit else None
    return b'{"items":[' + b",".join(items) + b'],"next_cursor":' + to_json(next_cursor) + b"}"  # type: ignore[arg-type]


def _encoded(rows: list[Any], wanted: dict[int, Key], now: Any) -> dict[Key, bytes] | None:
    """Each wanted item's brief, encoded, by its key; None unless every one was read at its wanted key."""
    made: dict[Key, bytes] = {}
    for override, votes, last_vote in grouped(rows):
        row: Any = override  # a row of BY_IDS_WITH_VOTES: `Answered` and its `rev`
        key = (row.id, row.rev, len(votes), last_vote, is_overdue(override, now))
        if wanted.get(row.id) != key:
            return None
        made[key] = _brief_json(override, votes, now)
    return made if len(made) == len(wanted) else None


def _brief_json(override: Answered, votes: list[VoteFields], now: Any) -> bytes:
    return to_json(brief_fields(override, votes, now), inf_nan_mode="null")
