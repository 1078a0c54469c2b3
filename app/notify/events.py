"""The webhook event, schema `tlsoverride.event/v1`: what every JSON sink receives.

An event is one audit row and, for an override's event, a full snapshot of the override *as it was at
that event*: what changes over an override's life (state, version, parameters, expiry, duration,
approvals, a pending extension) is read back from the override's own audit rows up to the event and from
the votes cast before it, so a receiver that gets an old event late (a retry, a re-queued dead letter)
never sees a later state under an earlier event's name. The rest (destination, ticket, justification,
requester, findings, the diagnosis verdict) never changes after the request; the mail queue evidence is
as last read (its own `checked_at`).

Additions keep the schema name; a change that would break a receiver gets `tlsoverride.event/v2`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.audit.models import AuditEvent
from app.core.config import Settings
from app.overrides.models import TERMINAL_STATES, Override, OverrideState, Vote
from app.overrides.stuck import from_json, queue_line
from app.overrides.summary import summarize

SCHEMA: Literal["tlsoverride.event/v1"] = "tlsoverride.event/v1"
ACTIONS = ("approve", "reject", "cancel", "revoke", "extend")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EventPerson(_Model):
    id: str = Field(description="As recorded: the token's `sub`, or the user an integration named.")
    name: str = Field(description="Display name.")
    key: str = Field(description="The canonical key people are compared by (no self-approval, one vote each).")


class EventApproval(_Model):
    reviewer: str
    reviewer_name: str
    via: str | None = Field(description="The integration (or `slack`) the reviewer acted through.")
    comment: str
    at: datetime


class EventPendingExtension(_Model):
    duration: timedelta = Field(description="ISO 8601, e.g. `P3D`.")
    requested_by: str


class EventFinding(_Model):
    rule: str
    severity: str
    message: str
    refused: bool = False


class EventDiagnosis(_Model):
    """The diagnosis at request time, in brief (the whole diagnosis is at the override's `self` link)."""

    verdict: str | None = Field(description="`ok`, `degraded`, `blocked`, `unknown`; null when not diagnosed.")
    failure_class: str | None = None
    recommended: str | None = Field(default=None, description="The least weakening policy that delivers.")
    checked_at: datetime | None = None
    error: str | None = Field(default=None, description="Why there is no diagnosis (rate limit, failure).")


class EventQueueReason(_Model):
    reason: str = Field(description="Postfix's delay reason (addresses replaced by `<…@domain>`).")
    recipients: int
    failure_class: str | None = Field(description="The diagnosis's failure class it points at, if any.")
    tls: bool = Field(description="A TLS/DANE failure, the kind an override is for.")


class EventQueue(_Model):
    """What mailcow's queue held deferred for the destination when last read (not at the event: see
    `checked_at`). Counts, reasons and times only, never addresses."""

    checked_at: datetime
    attributable: bool = Field(description="False for a next hop: the queue shows recipient domains only.")
    messages: int
    recipients: int
    oldest_arrival: datetime | None
    reasons: list[EventQueueReason]
    capped: bool = Field(description="mailcow lists at most 10,000 messages: the counts may be higher.")
    error: str | None = Field(description="Why the queue could not be read.")
    line: str | None = Field(examples=["14 messages to 9 recipients stuck for 3 h: Server certificate not verified"])


class EventSummary(_Model):
    line: str = Field(
        examples=["fingerprint · blocked (A: TLSA mismatch) · certificate pinned, not checked against DANE"]
    )
    loses: list[str] = Field(description="What mail loses under the policy, e.g. `plaintext allowed`.")
    verdict: str | None
    recommended: str | None
    weaker_than_recommended: bool | None


class EventLinks(_Model):
    self_: str = Field(alias="self")
    events: str
    approve: str
    reject: str
    cancel: str
    revoke: str
    extend: str
    request_again: str | None = Field(
        default=None,
        description="`recipient.still_failing` and `recipient.regressed` only: POST `details.request_again` here "
        "(`target`, `destination`, `policy`; add a justification) to ask for a new override.",
    )


# Events about a recipient after its override ended: they carry a link to request a new one.
REQUEST_AGAIN_EVENTS = frozenset({"recipient.still_failing", "recipient.regressed"})


class OverrideSnapshot(_Model):
    id: int
    version: int
    state: OverrideState
    target: str
    destination: str
    policy: str
    parameters: str
    ticket: str | None
    ticket_url: str | None
    justification: str
    requested_by: EventPerson
    requested_via: str | None = Field(description="The integration that submitted the request, if any.")
    approvals: list[EventApproval] = Field(description="Approving votes of the current round, so far.")
    approvals_required: int
    duration: timedelta = Field(description="ISO 8601 (`PT30M`, `P3D`), counted from when it is applied.")
    pending_extension: EventPendingExtension | None
    created_at: datetime
    review_deadline: datetime | None
    applied_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    findings: list[EventFinding]
    diagnosis: EventDiagnosis | None
    queue: EventQueue | None = Field(default=None, description="The mail queue for the destination, last read.")
    summary: EventSummary
    links: EventLinks = Field(description="Absolute URLs (TLSO_PUBLIC_BASE_URL); the actions are POSTs.")


class EventAudit(_Model):
    seq: int = Field(description="The audit row; events of one sink are sent in this order, retries aside.")
    hash: str
    prev_hash: str


class EventData(_Model):
    actor: str = Field(description="Who did it (`system` for the worker).")
    via: str | None = Field(description="The integration (or `slack`) it came through.")
    comment: str | None
    audit: EventAudit
    details: dict[str, Any] | None = Field(description="The audit row's `after`, as recorded in the trail.")
    override: OverrideSnapshot | None = Field(description="The override as it was at this event.")
    checkpoint: dict[str, Any] | None = Field(
        default=None, description="`audit.checkpoint` only: the signed checkpoint of the chain head."
    )


class WebhookEvent(_Model):
    """The body of every delivery to a `json` sink (Standard Webhooks: `type`, `timestamp`, `data`)."""

    schema_: Literal["tlsoverride.event/v1"] = Field(default=SCHEMA, alias="schema")
    type: str = Field(
        description="The audit action: `override.created`, `override.approved`, `audit.checkpoint`, … About the "
        "queue: `override.queue_released` (the destination's deferred mail handed to mailcow's deliver, "
        "`details.released`; none when nothing was deferred; `details.interrupted` names the end that cut it short), "
        "`override.still_stuck` (its mail deferred for TLS a "
        "minute later, or again later while active: the override does not help; once per episode), "
        "`override.queue_clear` (that mail is gone); after the end `recipient.still_failing` (mail defers for TLS "
        "again) and `recipient.regressed` (the diagnosis turned `blocked` again), with `links.request_again`."
    )
    timestamp: datetime = Field(description="When it happened (the audit row's time).")
    data: EventData


def override_links(settings: Settings, override_id: int) -> EventLinks:
    base = f"/v1/overrides/{override_id}"
    actions = {action: settings.link(f"{base}/{action}") for action in ACTIONS}
    return EventLinks.model_validate(
        {"self": settings.link(base), "events": settings.link(f"{base}/events"), **actions}
    )


def build_event(
    row: AuditEvent,
    settings: Settings,
    override: Override | None = None,
    votes: Sequence[Vote] = (),
    trail: Sequence[AuditEvent] = (),
) -> WebhookEvent:
    """The event for audit row `row`; `trail` is every audit row of its override (any order)."""
    snapshot = None
    if override is not None:
        snapshot = snapshot_at(override, votes, trail, row.seq, settings)
        if row.action in REQUEST_AGAIN_EVENTS:
            snapshot.links.request_again = settings.link("/v1/overrides")
    return WebhookEvent(
        type=row.action,
        timestamp=row.at,
        data=EventData(
            actor=row.actor,
            via=row.via,
            comment=row.comment,
            audit=EventAudit(seq=row.seq, hash=row.hash, prev_hash=row.prev_hash),
            details=_iso_durations(row.after),
            override=snapshot,
            checkpoint=row.after if row.action == "audit.checkpoint" else None,
        ),
    )


def snapshot_at(
    override: Override, votes: Sequence[Vote], trail: Sequence[AuditEvent], seq: int, settings: Settings
) -> OverrideSnapshot:
    """The override as it was right after audit row `seq` (see the module's docstring)."""
    rows = sorted(trail, key=lambda r: r.seq)
    upto = [r for r in rows if r.seq <= seq]
    at = upto[-1].at if upto else override.updated_at
    recorded: dict[str, Any] = {}
    for r in reversed(upto):
        if isinstance(r.after, dict) and "state" in r.after:
            recorded = r.after
            break
    state = OverrideState(recorded.get("state", override.state))
    round_ = sum(1 for r in upto if r.action == "override.extension_requested")
    approvals = [
        EventApproval(reviewer=v.reviewer, reviewer_name=v.reviewer_name, via=v.via, comment=v.comment, at=v.created_at)
        for v in sorted(votes, key=lambda v: v.created_at)
        if v.round == round_ and v.decision == "approve" and v.created_at <= at
    ]
    granted_later = sum(
        (
            _duration((r.after or {}).get("extended_by"))
            for r in rows
            if r.seq > seq and r.action == "override.extended"
        ),
        timedelta(0),
    )
    applied = [r.at for r in upto if r.action == "override.applied"]
    ended = next((r.at for r in upto if (r.after or {}).get("state") in {s.value for s in TERMINAL_STATES}), None)
    diagnosis = override.diagnosis or None
    return OverrideSnapshot(
        id=override.id or 0,
        version=int(recorded.get("version", override.version)),
        state=state,
        target=str(recorded.get("target", override.target)),
        destination=str(recorded.get("destination", override.destination)),
        policy=str(recorded.get("policy", override.policy)),
        parameters=str(recorded.get("parameters", override.parameters)),
        ticket=override.ticket,
        ticket_url=override.ticket_url,
        justification=override.justification,
        requested_by=EventPerson(
            id=override.requested_by, name=override.requested_by_name, key=override.requested_by_key
        ),
        requested_via=override.requested_via,
        approvals=approvals,
        approvals_required=override.approvals_required,
        duration=timedelta(seconds=override.duration_seconds) - granted_later,
        pending_extension=_pending_extension(upto, state),
        created_at=override.created_at,
        review_deadline=override.review_deadline,
        applied_at=applied[-1] if applied else None,
        expires_at=_datetime(recorded.get("expires_at")) if recorded else override.expires_at,
        ended_at=ended if state in TERMINAL_STATES else None,
        end_reason=override.end_reason if state in TERMINAL_STATES or state == OverrideState.removing else None,
        findings=[EventFinding.model_validate(f) for f in override.findings or []],
        diagnosis=_verdict(diagnosis),
        queue=_queue(override.queue),
        summary=EventSummary.model_validate(summarize(override.policy, override.parameters, diagnosis).__dict__),
        links=override_links(settings, override.id or 0),
    )


def _pending_extension(rows: Sequence[AuditEvent], state: OverrideState) -> EventPendingExtension | None:
    if state not in (OverrideState.approved, OverrideState.active):
        return None
    decided = ("override.extension_requested", "override.extended", "override.extension_rejected")
    last = next((r for r in reversed(rows) if r.action in decided), None)
    if last is None or last.action != "override.extension_requested":
        return None
    return EventPendingExtension(
        duration=_duration((last.after or {}).get("requested_extension")), requested_by=last.actor
    )


def _queue(stored: dict[str, Any] | None) -> EventQueue | None:
    evidence = from_json(stored) if stored else None
    if evidence is None:
        return None
    return EventQueue(
        checked_at=evidence.checked_at,
        attributable=evidence.attributable,
        messages=evidence.messages,
        recipients=evidence.recipients,
        oldest_arrival=evidence.oldest_arrival,
        reasons=[
            EventQueueReason(reason=r.reason, recipients=r.recipients, failure_class=r.failure_class, tls=r.tls)
            for r in evidence.reasons
        ],
        capped=evidence.capped,
        error=evidence.error,
        line=queue_line(evidence),
    )


def _verdict(diagnosis: dict[str, Any] | None) -> EventDiagnosis | None:
    if not diagnosis:
        return None
    if "verdict" not in diagnosis:
        return EventDiagnosis(verdict=None, error=str(diagnosis.get("error") or "no diagnosis"))
    best = diagnosis.get("recommended") or diagnosis.get("contingency")
    recommended = None
    if isinstance(best, dict) and best.get("policy"):
        recommended = f"{best['policy']} {best.get('parameters') or ''}".strip()
    return EventDiagnosis(
        verdict=str(diagnosis["verdict"]),
        failure_class=diagnosis.get("failure_class"),
        recommended=recommended,
        checked_at=_datetime(diagnosis.get("checked_at")),
    )


DURATION_KEYS = ("duration", "requested_extension", "extended_by")


def _iso_durations(after: dict[str, Any] | None) -> dict[str, Any] | None:
    """The audit row's `after` with its durations in ISO 8601, as the API writes them (`PT30M`)."""
    if after is None:
        return None
    result = dict(after)
    for key in DURATION_KEYS:
        if isinstance(result.get(key), str) and _TIMEDELTA_TEXT.match(result[key]):
            result[key] = _ISO.dump_python(_duration(result[key]), mode="json")
    return result


def _datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


_ISO = TypeAdapter(timedelta)
# The trail keeps durations as Python wrote them (`str(timedelta)`: `3 days, 0:00:00`, `0:30:00`).
_TIMEDELTA_TEXT = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d)(?:\.(\d+))?$")


def _duration(value: Any) -> timedelta:
    if isinstance(value, (int, float)):
        return timedelta(seconds=value)
    match = _TIMEDELTA_TEXT.match(str(value or ""))
    if match is None:
        return timedelta(0)
    days, hours, minutes, seconds, _ = match.groups()
    return timedelta(days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=int(seconds))
