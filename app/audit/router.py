"""Read, export and verify the audit trail (auditors and admins)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlmodel import col, select

from app.audit.models import AuditEvent
from app.audit.service import VerifyResult, as_dict, iter_events, to_csv_rows, to_jsonl, verify_chain
from app.core.auth import Principal, require
from app.core.db import ReadSessionDep, reading
from app.core.errors import problem_responses
from app.core.text import MAX_ID, Filter, decode_cursor, encode_cursor
from app.overrides.schemas import EventPage, EventRead

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Reader = Annotated[Principal, require("auditor", "admin")]
ERRORS = problem_responses(401, 403, 422)


@router.get("", response_model=EventPage, summary="Audit events, oldest first", responses=ERRORS)
def list_events(
    session: ReadSessionDep,
    _: Reader,
    action: Filter = None,
    actor: Filter = None,
    override_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventPage:
    query = select(AuditEvent).where(AuditEvent.seq > (decode_cursor("a", cursor) or 0))
    if action:
        query = query.where(AuditEvent.action == action)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if override_id is not None:
        query = query.where(AuditEvent.override_id == override_id)
    rows = list(session.exec(query.order_by(col(AuditEvent.seq)).limit(limit + 1)).all())
    next_cursor = encode_cursor("a", rows[limit - 1].seq) if len(rows) > limit else None
    return EventPage(items=[EventRead.model_validate(as_dict(r)) for r in rows[:limit]], next_cursor=next_cursor)


@router.get("/verify", response_model=VerifyResult, summary="Recompute the hash chain", responses=ERRORS)
def verify(session: ReadSessionDep, _: Reader) -> VerifyResult:
    """`valid` is false and `first_broken` names the first row whose hash or link does not hold."""
    return verify_chain(session)


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
            for event_row in iter_events(session):
                yield as_dict(event_row)

    if format == "csv":
        return StreamingResponse(
            to_csv_rows(events()),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
        )
    return StreamingResponse(
        (to_jsonl(e) for e in events()),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
    )
