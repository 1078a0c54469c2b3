"""The hot reads build their answers from Core rows (app/overrides/reads.py; on PostgreSQL fetched by psycopg
directly, app/core/db.py `AsyncReads`): the same bytes as the answer built from the ORM's `Override` and
`Vote`, for an override that has every part an answer shows (votes of two rounds, a pending extension,
queue evidence, a queue release, findings, a diagnosis, a conflict, drift, an error)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy.engine import Engine

from app.core.db import transaction
from app.overrides import lifecycle, service
from app.overrides.reads import to_brief, to_read, vote_reads
from app.overrides.schemas import OverrideBrief, OverrideRead
from app.overrides.stuck import QueueEvidence, ReasonCount
from tests.helpers import act, apply_now

QUEUE = QueueEvidence(
    destination="full.example",
    checked_at=datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
    messages=14,
    recipients=9,
    oldest_arrival=datetime(2026, 12, 1, 6, 12, tzinfo=UTC),
    reasons=(ReasonCount("Server certificate not verified", 9, "A", "TLSA mismatch", tls=True),),
).as_json()


def _every_part(client: Any, engine: Engine, make_override: Any, auth: Any) -> int:
    """An active override with an approval, an extension asked for and approved once, and every JSON column
    filled; returns its id."""
    created = make_override(destination="full.example", ticket="OPS-77")
    override_id: int = created["id"]
    assert act(client, override_id, "approve", auth("bob", "approver")).status_code == 200
    apply_now(engine, override_id)
    assert act(client, override_id, "extend", auth("alice", "requester"), duration="P1D").status_code == 200
    assert act(client, override_id, "approve", auth("carol", "approver")).status_code == 200
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        override.queue = QUEUE
        override.queue_release = {"status": "still_stuck", "still_stuck": True, "released": 3, "asking": ["A1"]}
        override.findings = [{"rule": "weak", "severity": "warning", "message": "plaintext allowed"}]
        override.diagnosis = {"verdict": "blocked", "failure_class": "A", "hosts": [{"name": "mx.full.example"}]}
        override.conflict = {"status": "open", "snapshot": {"dest": "full.example", "policy": "dane"}}
        override.drift = {"seen": "2026-12-01T10:00:00+00:00"}
        override.last_error = "mailcow answered 502"
        override.removal_deadline = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=UTC)
    return override_id


def _orm_answer(engine: Engine, override_id: int) -> tuple[OverrideRead, OverrideBrief]:
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id)
        votes = vote_reads(service.votes_of(session, override_id))
        return to_read(override, votes), to_brief(override, votes)


def test_the_core_answers_are_the_orm_answers_byte_for_byte(
    client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    override_id = _every_part(client, engine, make_override, auth)
    full, brief = _orm_answer(engine, override_id)
    assert len(full.votes) == 2 and full.queue is not None and full.summary.stuck_mail and full.findings
    reviewer = auth("bob", "approver")

    answer = client.get(f"/v1/overrides/{override_id}", headers=reviewer)
    assert answer.status_code == 200
    assert answer.content == TypeAdapter(OverrideRead).dump_json(full, by_alias=True)
    assert answer.headers["ETag"] == f'"{full.version}"'

    page = client.get("/v1/overrides", params={"ticket": "OPS-77"}, headers=reviewer)
    [item] = page.json()["items"]
    assert item == json.loads(TypeAdapter(OverrideBrief).dump_json(brief, by_alias=True))
    assert TypeAdapter(OverrideBrief).dump_json(brief, by_alias=True) in page.content

    full_page = client.get("/v1/overrides", params={"ticket": "OPS-77", "view": "full"}, headers=reviewer)
    assert TypeAdapter(OverrideRead).dump_json(full, by_alias=True) in full_page.content


def test_a_pending_extension_and_its_approvals_read_alike(
    client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    created = make_override(destination="ext.example")
    override_id = created["id"]
    assert act(client, override_id, "approve", auth("bob", "approver")).status_code == 200
    apply_now(engine, override_id)
    assert act(client, override_id, "extend", auth("alice", "requester"), duration="PT12H").status_code == 200
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        override.approvals_required = 2  # the extension waits for a second approval
    assert act(client, override_id, "approve", auth("carol", "approver")).status_code == 200
    full, _ = _orm_answer(engine, override_id)
    assert full.pending_extension is not None and full.pending_extension.duration == timedelta(hours=12)
    answer = client.get(f"/v1/overrides/{override_id}", headers=auth("bob", "approver"))
    assert answer.content == TypeAdapter(OverrideRead).dump_json(full, by_alias=True)
