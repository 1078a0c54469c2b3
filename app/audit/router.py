"""Read, export and verify the audit trail (auditors and admins)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic_core import to_json
from sqlalchemy import Integer, Select, bindparam, select

from app.audit.export import in_chunks, to_csv_rows, to_jsonl
from app.audit.models import AuditEvent
from app.audit.schemas import AuditKey, AuditKeys, EventPage, EventRead, PublishedCheckpoints
from app.audit.service import VerifyResult, exported_rows, verify_chain
from app.audit.signing import PublicKey
from app.core.auth import Principal, require
from app.core.db import ReadSessionDep, read_rows, reading
from app.core.errors import problem_responses
from app.core.text import MAX_ID, Filter, decode_cursor, encode_cursor

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Reader = Annotated[Principal, require("auditor", "admin")]
ERRORS = problem_responses(401, 403, 422)


@router.get("", response_model=EventPage, summary="Audit events, oldest first", responses=ERRORS)
async def list_events(
    request: Request,
    _: Reader,
    action: Filter = None,
    actor: Filter = None,
    override_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    # `async`: one statement, on the event loop on PostgreSQL (`read_rows`); the page is encoded from the
    # columns as `EventPage` would encode them (tests/audit/test_service.py), without a model per row.
    filters = {"action": action, "actor": actor, "override_id": override_id}
    params: dict[str, Any] = {"after": decode_cursor("a", cursor) or 0, "limit": limit + 1}
    params |= {name: value for name, value in filters.items() if value is not None}
    rows = await read_rows(request, _page_statement(tuple(sorted(params))), params)
    next_cursor = encode_cursor("a", rows[limit - 1].seq) if len(rows) > limit else None
    items = [row._asdict() for row in rows[:limit]]
    return Response(to_json({"items": items, "next_cursor": next_cursor}, inf_nan_mode="null"), media_type=_JSON)


_JSON = "application/json"
_EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]
_EVENT_COLUMNS = tuple(_EVENTS.c[name] for name in EventRead.model_fields)


@lru_cache(maxsize=16)
def _page_statement(names: tuple[str, ...]) -> Select[Any]:
    """The page for these parameters (`after`, `limit`, and the filters given), oldest first."""
    filters = [_EVENTS.c[name] == bindparam(name) for name in names if name in ("action", "actor", "override_id")]
    return (
        select(*_EVENT_COLUMNS)
        .where(_EVENTS.c.seq > bindparam("after"), *filters)
        .order_by(_EVENTS.c.seq)
        .limit(bindparam("limit", type_=Integer))
    )


def _keys(request: Request) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = request.app.state.audit_keys
    return keys


@router.get(
    "/verify", response_model=VerifyResult, summary="Recompute the hash chain and its checkpoints", responses=ERRORS
)
def verify(request: Request, session: ReadSessionDep, _: Reader) -> VerifyResult:
    """`valid` is false and `first_broken` names the first row that cannot be trusted: one whose hash or
    link does not hold, or rows rewritten and re-hashed before a signed checkpoint. Rows after
    `anchored_through` are only as trustworthy as the database: a cut-off tail shows only against a
    checkpoint published outside it (`POST`)."""
    return verify_chain(session, _keys(request))


@router.post(
    "/verify",
    response_model=VerifyResult,
    summary="Verify the trail against checkpoints published outside the database",
    responses=problem_responses(400, 401, 403, 422),
)
def verify_against(request: Request, session: ReadSessionDep, _: Reader, body: PublishedCheckpoints) -> VerifyResult:
    """As `GET`, and also: the trail must reach each checkpoint given, with the hash it signed (a trail cut
    short, or rewritten and re-hashed, after the last checkpoint stored in it is found only so)."""
    return verify_chain(session, _keys(request), body.checkpoints)


@router.get(
    "/public-keys",
    response_model=AuditKeys,
    summary="The public keys that verify the trail's signed checkpoints",
    responses=ERRORS,
)
def public_keys(request: Request, _: Reader) -> AuditKeys:
    """Keep a copy from when the service was set up: a key fetched from the service you audit proves little."""
    return AuditKeys(keys=[AuditKey.model_validate(key.describe()) for key in _keys(request).values()])


@router.get(
    "/export",
    summary="Export the whole trail (JSON Lines or CSV), verifiable offline",
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}, **ERRORS},
)
def export(request: Request, _: Reader, format: Literal["jsonl", "csv"] = "jsonl") -> StreamingResponse:
    """Streamed in sequence order; check it with `python -m app audit verify --file FILE`."""
    engine = request.app.state.engine

    def events() -> Iterator[dict[str, object]]:
        with reading(engine) as session:
            yield from exported_rows(session)

    if format == "csv":
        return StreamingResponse(
            in_chunks(to_csv_rows(events())),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
        )
    return StreamingResponse(
        in_chunks(to_jsonl(e) for e in events()),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
    )
