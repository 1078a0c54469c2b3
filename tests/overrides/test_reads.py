"""The hot reads build their answers from Core rows (app/overrides/reads.py; on PostgreSQL fetched by psycopg
directly, app/core/db.py `AsyncReads`): the same bytes as the answer built from the ORM's `Override` and
`Vote`, for an override that has every part an answer shows (votes of two rounds, a pending extension,
queue evidence, a queue release, findings, a diagnosis, a conflict, drift, an error).

A page of briefs is encoded from plain fields without validating a model per item (`brief_page_json`): the
same bytes as `OverridePage` of `OverrideBrief`s dumped by its TypeAdapter (the route's `response_model`
path before), for any shape of row (states, votes, nulls, unicode, timestamps, odd JSON), and through the
API for a page of overrides in many states."""

from __future__ import annotations

import json
from collections import namedtuple
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from app.core.db import transaction, utcnow
from app.mailcow.policies import TlsPolicy
from app.overrides import lifecycle, service
from app.overrides.models import EndReason, Override, OverrideState
from app.overrides.reads import (
    Answered,
    VoteFields,
    brief_fields,
    brief_page_json,
    read_json,
    to_read,
    vote_reads,
)
from app.overrides.schemas import FindingRead, OverrideBrief, OverridePage, OverrideRead, VoteRead
from app.overrides.stuck import QueueEvidence, ReasonCount
from tests.helpers import act, apply_now, worker_step

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


def model_brief(override: Answered, votes: list[VoteFields]) -> OverrideBrief:
    """The brief as the list route built it before it encoded pages directly: every item validated into an
    `OverrideBrief`, its stored findings into `FindingRead`s."""
    fields = brief_fields(override, votes) | {
        "findings": [FindingRead.model_validate(f) for f in override.findings or []]
    }
    return OverrideBrief(**fields)


def model_page(page: list[tuple[Answered, list[VoteFields]]], next_cursor: str | None) -> bytes:
    """A page of briefs as the route's `response_model` (`OverridePage`) encodes it."""
    items: list[OverrideRead | OverrideBrief] = [model_brief(override, votes) for override, votes in page]
    return TypeAdapter(OverridePage).dump_json(OverridePage(items=items, next_cursor=next_cursor), by_alias=True)


def _orm_answer(engine: Engine, override_id: int) -> tuple[OverrideRead, OverrideBrief]:
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id)
        votes = vote_reads(service.votes_of(session, override_id))
        return to_read(override, votes), model_brief(override, votes)


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
    # The values, not only the encoding: each round's approvals in its own place, in the list and the answer.
    [item] = client.get("/v1/overrides", params={"destination": "ext.example"}, headers=auth("bob", "approver")).json()[
        "items"
    ]
    for shown in (item, answer.json()):
        assert [a["reviewer"] for a in shown["approvals"]] == ["bob"]
        assert [a["reviewer"] for a in shown["pending_extension"]["approvals"]] == ["carol"]


# ---------------------------------------------------------------------------------------------------------------
# A page of briefs, encoded without models: the same bytes as the models give

_Row = namedtuple("_Row", list(Answered.__annotations__))  # type: ignore[misc]
_TEXT = st.text(max_size=12)  # any unicode but lone surrogates: umlauts, emoji, controls, quotes, NUL
_MOMENT = st.one_of(
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,  # NaN and infinities included
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_DIAGNOSIS = st.one_of(
    st.none(),
    st.just({}),
    st.fixed_dictionaries({"error": _TEXT}),
    st.fixed_dictionaries(
        {"verdict": st.sampled_from(["ok", "blocked", "unsigned"]) | _TEXT},
        optional={
            "failure_class": st.sampled_from(["A", "A''", "K", "Z", ""]) | st.none(),
            "recommended": st.fixed_dictionaries(
                {"policy": st.sampled_from(get_args(TlsPolicy)) | _TEXT},
                optional={"parameters": _TEXT | st.none()},
            ),
            "contingency": st.fixed_dictionaries({"policy": st.sampled_from(["may", "dane-only"])}),
            "hosts": st.lists(_JSON, max_size=2),
        },
    ),
)
_QUEUE = st.one_of(
    st.none(),
    st.fixed_dictionaries({"error": _TEXT}),
    st.builds(
        lambda destination, checked, age, messages, recipients, capped, reasons, attributable: QueueEvidence(
            destination=destination,
            checked_at=checked,
            attributable=attributable,
            messages=messages,
            recipients=recipients,
            oldest_arrival=None if age is None else checked - timedelta(seconds=age),
            capped=capped,
            reasons=tuple(ReasonCount(r, n, None, None, tls=False) for r, n in reasons),
        ).as_json(),
        _TEXT,
        st.datetimes(timezones=st.just(UTC)).filter(lambda d: d.year > 1),
        st.none() | st.integers(0, 10**7),
        st.integers(0, 10**5),
        st.integers(0, 10**5),
        st.booleans(),
        st.lists(st.tuples(_TEXT, st.integers(1, 99)), max_size=4),
        st.booleans(),
    ),
)
_FINDING = st.fixed_dictionaries(
    {"rule": _TEXT, "severity": st.sampled_from(["info", "warning", "error"]), "message": _TEXT},
    optional={"refused": st.booleans(), "extra": _JSON},  # a key the answer does not show is left out
)
_VOTE = st.builds(
    lambda *values: dict(zip(VoteRead.model_fields, values, strict=True)),  # as `reads` makes them: in order
    _TEXT,
    _TEXT,
    st.none() | _TEXT,
    st.sampled_from(["approve", "reject"]),
    _TEXT,
    st.integers(0, 2),
    _MOMENT,
)
_OPTIONAL_MOMENT = st.none() | _MOMENT
_ROW = st.builds(
    _Row,
    id=st.integers(1, 2**62),
    target=_TEXT,
    destination=_TEXT,
    policy=st.sampled_from(get_args(TlsPolicy)) | _TEXT,
    parameters=_TEXT,
    justification=st.text(max_size=60),
    ticket=st.none() | _TEXT,
    ticket_url=st.none() | _TEXT,
    duration_seconds=st.integers(0, 10**9),
    state=st.sampled_from(OverrideState),
    version=st.integers(1, 10**6),
    requested_by=_TEXT,
    requested_by_key=_TEXT,
    requested_by_name=_TEXT,
    requested_via=st.none() | _TEXT,
    approvals_required=st.integers(0, 5),
    created_at=_MOMENT,
    updated_at=_MOMENT,
    review_deadline=_OPTIONAL_MOMENT,
    applied_at=_OPTIONAL_MOMENT,
    expires_at=_OPTIONAL_MOMENT,
    ended_at=_OPTIONAL_MOMENT,
    end_reason=st.none() | st.sampled_from(EndReason),
    removal_deadline=_OPTIONAL_MOMENT,
    extension_round=st.integers(0, 2),
    extension_seconds=st.none() | st.integers(0, 10**9),
    extension_requested_by=st.none() | _TEXT,
    mailcow_id=st.none() | st.integers(0, 2**40),
    last_error=st.none() | _TEXT,
    conflict=st.none() | st.dictionaries(_TEXT, _JSON, max_size=3),
    drift=st.none() | st.dictionaries(_TEXT, _JSON, max_size=3),
    diagnosis=_DIAGNOSIS,
    findings=st.none() | st.lists(_FINDING, max_size=3),
    queue=_QUEUE,
    queue_release=st.none() | st.dictionaries(st.sampled_from(["status", "still_stuck", "released"]), _JSON),
)


@given(
    page=st.lists(st.tuples(_ROW, st.lists(_VOTE, max_size=4)), max_size=4),
    next_cursor=st.none() | _TEXT,
)
@settings(max_examples=300)
def test_a_page_of_briefs_is_the_models_page_byte_for_byte(
    page: list[tuple[Answered, list[VoteFields]]], next_cursor: str | None
) -> None:
    assert brief_page_json(page, next_cursor) == model_page(page, next_cursor)


@given(
    # Stored queue evidence is `QueueEvidence.as_json()`'s (or none): the full answer shows it by its model.
    row=_ROW.filter(lambda row: row.queue is None or "checked_at" in row.queue),
    votes=st.lists(_VOTE, max_size=4),
)
@settings(max_examples=300)
def test_a_full_answer_is_the_models_byte_for_byte(row: Answered, votes: list[VoteFields]) -> None:
    """`read_json` (a single override's answer: `GET /v1/overrides/{id}`, a create) is `to_read`'s model."""
    assert read_json(row, votes) == TypeAdapter(OverrideRead).dump_json(to_read(row, votes), by_alias=True)


def test_a_page_through_the_api_is_the_models_page_byte_for_byte(
    app: Any, backend: str, client: Any, engine: Engine, make_override: Any, auth: Any
) -> None:
    """Overrides in many states (votes of both kinds and rounds, ended, removing past its deadline, unicode,
    no ticket), listed in pages of three and as one page: each page is the models' page of the same rows
    (on PostgreSQL through the kept briefs; SQLite reads each page in one statement and keeps none)."""
    reviewer, admin = auth("bob", "approver"), auth("root", "admin")
    _every_part(client, engine, make_override, auth)
    make_override(destination="pending.example", ticket=None, justification="Empfänger ✉ „TLSA“ 🚀 — 証明書 \u200d ok")
    approved = make_override(destination="bücher.example", policy="may")["id"]
    assert act(client, approved, "approve", reviewer).status_code == 200
    rejected = make_override(destination="rejected.example")["id"]
    assert act(client, rejected, "reject", reviewer).status_code == 200
    cancelled = make_override(destination="cancelled.example")["id"]
    assert act(client, cancelled, "cancel", auth("alice", "requester")).status_code == 200
    for name, late in (("revoked", True), ("ending", False)):
        ended = make_override(destination=f"{name}.example", ticket="OPS-9")["id"]
        assert act(client, ended, "approve", reviewer).status_code == 200
        apply_now(engine, ended)
        assert act(client, ended, "revoke", admin).status_code == 200
        if late:
            with transaction(engine) as session:
                override = lifecycle.load(session, ended, for_update=True)
                override.removal_deadline = datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    expired = make_override(destination="expired.example")["id"]
    assert act(client, expired, "approve", reviewer).status_code == 200
    apply_now(engine, expired)
    worker_step(engine, expired, OverrideState.removing, "override.expiring", end_reason=EndReason.expired)
    worker_step(engine, expired, OverrideState.expired, "override.removed", ended_at=utcnow())

    with transaction(engine) as session:
        ids = [i or 0 for i in session.exec(select(Override.id).order_by(col(Override.id).desc())).all()]
        everything = [(lifecycle.load(session, i), vote_reads(service.votes_of(session, i))) for i in ids]
    assert {override.state for override, _ in everything} >= {
        OverrideState.pending,
        OverrideState.approved,
        OverrideState.active,
        OverrideState.rejected,
        OverrideState.cancelled,
        OverrideState.removing,
        OverrideState.expired,
    }

    answer = client.get("/v1/overrides", params={"limit": 50}, headers=reviewer)
    assert answer.status_code == 200
    assert answer.content == model_page(everything, None)  # type: ignore[arg-type]
    cursor, seen = None, 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        answer = client.get("/v1/overrides", params=params, headers=reviewer)
        cursor = answer.json()["next_cursor"]
        assert answer.content == model_page(everything[seen : seen + 3], cursor)  # type: ignore[arg-type]
        seen += 3
        if cursor is None:
            break
    assert seen >= len(everything)
    assert (getattr(app.state, "tlso_brief_cache", None) is not None) == (backend == "postgres")
