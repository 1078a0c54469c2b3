"""The override as the API answers it (`OverrideRead`, and `OverrideBrief` in lists), built from an `Override`
or straight from the columns of a Core select: the hot reads (`GET /v1/overrides/{id}`, a list page) select
only the columns an answer shows, with the votes joined in the same statement, and build the answer from the
rows without the ORM (no identity map, no instances). Both sources give the same answer, byte for byte:
the columns have the same types either way (tests/overrides/test_reads.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from pydantic_core import to_json
from sqlalchemy import CTE, Integer, Select, String, any_, bindparam, func, literal_column, select, true
from sqlalchemy.dialects.postgresql import ARRAY

from app.core.db import utcnow
from app.core.text import encode_cursor
from app.overrides.lifecycle import is_overdue
from app.overrides.models import Override, OverrideState, Vote
from app.overrides.schemas import OverrideRead, QueueEvidenceRead
from app.overrides.stuck import queue_line
from app.overrides.summary import summarize


class Answered(Protocol):
    """What an answer reads of an override: an `Override`, or a row of `ANSWER_COLUMNS` (same names, same
    types). `requested_by_key` is for the visibility check (`permissions.can_see`), not shown."""

    id: int | None
    target: str
    destination: str
    policy: str
    parameters: str
    justification: str
    ticket: str | None
    ticket_url: str | None
    duration_seconds: int
    state: OverrideState
    version: int
    requested_by: str
    requested_by_key: str
    requested_by_name: str
    requested_via: str | None
    approvals_required: int
    created_at: datetime
    updated_at: datetime
    review_deadline: datetime | None
    applied_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: Any
    removal_deadline: datetime | None
    extension_round: int
    extension_seconds: int | None
    extension_requested_by: str | None
    mailcow_id: int | None
    last_error: str | None
    conflict: dict[str, Any] | None
    drift: dict[str, Any] | None
    diagnosis: dict[str, Any] | None
    findings: list[dict[str, Any]] | None
    queue: dict[str, Any] | None
    queue_release: dict[str, Any] | None


_OVERRIDE = Override.__table__  # type: ignore[attr-defined]
_VOTE = Vote.__table__  # type: ignore[attr-defined]

# The override's columns an answer reads (`Answered`), by their attribute names; the worker's bookkeeping
# (leases, attempts, due times) is left out.
ANSWER_COLUMNS = tuple(_OVERRIDE.c[name] for name in Answered.__annotations__)
# A vote's columns, named apart from the override's in a joined row.
_VOTE_COLUMNS = (
    _VOTE.c.id.label("vote_id"),
    _VOTE.c.reviewer.label("vote_reviewer"),
    _VOTE.c.reviewer_name.label("vote_reviewer_name"),
    _VOTE.c.via.label("vote_via"),
    _VOTE.c.decision.label("vote_decision"),
    _VOTE.c.comment.label("vote_comment"),
    _VOTE.c.round.label("vote_round"),
    _VOTE.c.created_at.label("vote_at"),
)

# One override and its votes in vote order, in one statement (an override without votes is one row of
# NULL votes); built once, run with `{"override_id": …}`.
ONE_WITH_VOTES: Select[Any] = (
    select(*ANSWER_COLUMNS, *_VOTE_COLUMNS)
    .select_from(_OVERRIDE.outerjoin(_VOTE, _VOTE.c.override_id == _OVERRIDE.c.id))
    .where(_OVERRIDE.c.id == bindparam("override_id"))
    .order_by(_VOTE.c.id)
)


def with_votes(page: CTE) -> Select[Any]:
    """A page of overrides (a CTE of `ANSWER_COLUMNS`, in the page's order) with their votes joined: the
    page's order, then each override's votes in vote order (`page_of` reads it)."""
    return (
        select(page, *_VOTE_COLUMNS)
        .select_from(page.outerjoin(_VOTE, _VOTE.c.override_id == page.c.id))
        .order_by(page.c.id.desc(), _VOTE.c.id)
    )


# A vote as answers show it: `VoteRead`'s fields in its order, with the values its JSON holds before encoding
# (a list page is encoded from these directly; a full answer validates them into `VoteRead`).
VoteFields = dict[str, Any]


def _vote_of_row(row: Any) -> VoteFields:
    return {
        "reviewer": row.vote_reviewer,
        "reviewer_name": row.vote_reviewer_name,
        "via": row.vote_via,
        "decision": row.vote_decision,
        "comment": row.vote_comment,
        "round": row.vote_round,
        "at": row.vote_at,
    }


def one_with_votes(rows: Sequence[Any]) -> tuple[Answered, list[VoteFields]] | None:
    """The override and its votes from the rows of `ONE_WITH_VOTES` (None: no such override)."""
    if not rows:
        return None
    votes = [_vote_of_row(row) for row in rows if row.vote_id is not None]
    return cast(Answered, rows[0]), votes


def page_of(rows: Sequence[Any], limit: int) -> tuple[list[tuple[Answered, list[VoteFields]]], str | None]:
    """The overrides of a `with_votes` page (at most `limit`, each with its votes) and the cursor of the
    next page (None: this is the last), from its rows (one per vote, or one for an override without)."""
    page = [(override, votes) for override, votes, _ in grouped(rows)]
    next_cursor = encode_cursor("o", page[limit - 1][0].id or 0) if len(page) > limit else None
    return page[:limit], next_cursor


def grouped(rows: Sequence[Any]) -> list[tuple[Answered, list[VoteFields], int | None]]:
    """Each override of `with_votes` rows with its votes and the id of its last vote (None: no votes)."""
    overrides: list[tuple[Answered, list[VoteFields], int | None]] = []
    last = None
    for row in rows:
        if row.id != last:
            last = row.id
            overrides.append((cast(Answered, row), [], None))
        if row.vote_id is not None:
            override, votes, _ = overrides[-1]
            votes.append(_vote_of_row(row))
            overrides[-1] = (override, votes, row.vote_id)
    return overrides


# PostgreSQL: the version of the override's row a read saw (the transaction that wrote it), as text; with
# the vote count and the last vote's id, the key of an encoded brief (app/overrides/briefs.py).
_REV = literal_column("override.xmin::text", String).label("rev")
STAMP_COLUMNS = (_OVERRIDE.c.id, _REV, _OVERRIDE.c.state, _OVERRIDE.c.removal_deadline)


def with_stamps(page: CTE) -> Select[Any]:
    """A page of overrides (a CTE of `STAMP_COLUMNS`, in the page's order), one row each: the id, `rev`,
    what `overdue` is computed from, and the count and last id of its votes (`votes`, `last_vote`)."""
    votes = (
        select(func.count(_VOTE.c.id).label("votes"), func.max(_VOTE.c.id).label("last_vote"))
        .where(_VOTE.c.override_id == page.c.id)
        .lateral("votes")
    )
    return (
        select(page.c.id, page.c.rev, page.c.state, page.c.removal_deadline, votes.c.votes, votes.c.last_vote)
        .select_from(page.outerjoin(votes, true()))
        .order_by(page.c.id.desc())
    )


# The overrides with the ids `{"ids": [...]}` in full with their votes, and `rev`: as `with_votes` reads them.
BY_IDS_WITH_VOTES = with_votes(
    select(*ANSWER_COLUMNS, _REV).where(_OVERRIDE.c.id == any_(bindparam("ids", type_=ARRAY(Integer)))).cte("page")
)


def vote_reads(votes: Iterable[Vote]) -> list[VoteFields]:
    return [
        {
            "reviewer": v.reviewer,
            "reviewer_name": v.reviewer_name,
            "via": v.via,
            "decision": v.decision,
            "comment": v.comment,
            "round": v.round,
            "at": v.created_at,
        }
        for v in votes
    ]


def brief_fields(override: Answered, votes: list[VoteFields], now: datetime | None = None) -> dict[str, Any]:
    """The fields an override's brief and full answers share, in `OverrideBrief`'s order, as plain values
    (nested parts as dicts in their models' field order): what `OverrideBrief` holds, so that encoding them
    as they are gives its JSON (`brief_page_json`) and validating them gives the model (`to_read`)."""
    pending = None
    if override.extension_seconds:
        pending = {
            "duration": timedelta(seconds=override.extension_seconds),
            "requested_by": override.extension_requested_by or "",
            "approvals": [v for v in votes if v["round"] == override.extension_round and v["decision"] == "approve"],
        }
    review = summarize(override.policy, override.parameters, override.diagnosis)
    return {
        "summary": {
            "line": review.line,
            "loses": list(review.loses),
            "verdict": review.verdict,
            "recommended": review.recommended,
            "weaker_than_recommended": review.weaker_than_recommended,
            "stuck_mail": queue_line(override.queue) if override.ended_at is None else None,
        },
        "id": override.id or 0,
        "target": override.target,
        "destination": override.destination,
        "policy": override.policy,
        "parameters": override.parameters,
        "justification": override.justification,
        "ticket": override.ticket,
        "ticket_url": override.ticket_url,
        "duration": timedelta(seconds=override.duration_seconds),
        "state": override.state,
        "requested_by": override.requested_by,
        "requested_by_name": override.requested_by_name,
        "requested_via": override.requested_via,
        "approvals": [v for v in votes if v["round"] == 0 and v["decision"] == "approve"],
        "approvals_required": override.approvals_required,
        "created_at": override.created_at,
        "updated_at": override.updated_at,
        "review_deadline": override.review_deadline,
        "applied_at": override.applied_at,
        "expires_at": override.expires_at,
        "ended_at": override.ended_at,
        "end_reason": override.end_reason,
        "removal_deadline": override.removal_deadline,
        "overdue": is_overdue(override, now),
        "pending_extension": pending,
        "mailcow_id": override.mailcow_id,
        "conflict": override.conflict,
        "drift": override.drift,
        "last_error": override.last_error,
        "findings": [_finding(f) for f in override.findings or []],
        "still_stuck": bool((override.queue_release or {}).get("still_stuck")),
        "version": override.version,
        "links": {"self": f"/v1/overrides/{override.id}", "events": f"/v1/overrides/{override.id}/events"},
    }


def _finding(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored finding as `FindingRead` shows it: its fields only, `refused` false unless it says so."""
    return {
        "rule": stored["rule"],
        "severity": stored["severity"],
        "message": stored["message"],
        "refused": stored.get("refused", False),
    }


def to_read(override: Answered, votes: list[VoteFields]) -> OverrideRead:
    """The override in full, with its votes (all rounds, in vote order)."""
    return OverrideRead(
        **brief_fields(override, votes),
        queue_release=_shown_release(override.queue_release),
        votes=votes,
        queue=override.queue,
        diagnosis=override.diagnosis,
    )


def read_json(override: Answered, votes: list[VoteFields]) -> bytes:
    """`to_read`'s model as JSON (`OverrideRead`), encoded from the plain fields as `brief_page_json` encodes
    a brief, without validating the whole model: only the stored queue evidence goes through its model
    (`QueueEvidenceRead` picks and orders its keys). The same bytes (tests/overrides/test_reads.py)."""
    queue = None if override.queue is None else QueueEvidenceRead.model_validate(override.queue)
    fields = brief_fields(override, votes) | {
        "votes": votes,
        "queue": queue,
        "queue_release": _shown_release(override.queue_release),
        "diagnosis": override.diagnosis,
    }
    return to_json(fields, inf_nan_mode="null")


def _shown_release(release: dict[str, Any] | None) -> dict[str, Any] | None:
    # The queue ids a release in flight notes for a takeover are the worker's bookkeeping, not evidence.
    return {k: v for k, v in release.items() if k != "asking"} if release else None


def brief_page_json(page: Sequence[tuple[Answered, list[VoteFields]]], next_cursor: str | None) -> bytes:
    """A page of briefs (`OverridePage` of `OverrideBrief`s) as JSON: the same bytes as the models would give,
    encoded from the plain fields without building and validating a model per item (which cost most of a
    page's time). pydantic's own encoder (`to_json`) writes each value as the models' serialisers do: the
    same datetime, duration and enum forms, NaN and infinities as null (tests/overrides/test_reads.py)."""
    now = utcnow()
    items = [brief_fields(override, votes, now) for override, votes in page]
    return to_json({"items": items, "next_cursor": next_cursor}, inf_nan_mode="null")
