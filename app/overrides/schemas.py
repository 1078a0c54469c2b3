"""The public API shapes of overrides (integrators code against these names: keep them)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.core.durations import DESCRIPTION as DURATION_RULES
from app.core.durations import IsoDuration
from app.core.text import Line, Text, visible_length
from app.mailcow.policies import TlsPolicy
from app.overrides.models import OverrideState


class OverrideCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "destination": "example.org",
                    "policy": "fingerprint",
                    "parameters": "match=7F:92:30:AA:01:02:03:04:05:06:07:08:09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:15:"
                    "16:17:18:19:1A:1B:1C",
                    "justification": "Recipient rotated its key without updating TLSA; mail queued since 09:00.",
                    "ticket": "OPS-1234",
                    "duration": "P3D",
                }
            ]
        },
    )

    target: Line | None = Field(
        default=None, max_length=100, description="mailcow instance; default target if omitted."
    )
    destination: str = Field(
        max_length=300,
        description="The recipient domain (`example.org`), or a next hop as your transport or relayhost writes "
        "it: `[mx.example.net]:25`, `[192.0.2.1]`, `[2001:db8::1]:25` or `[ipv6:2001:db8::1]:25` (Postfix looks "
        "the policy up by the next hop exactly as written, so the two IPv6 forms are different keys). Normalised: "
        "lower case, IDNA A-labels, IPv6 in its RFC 5952 short form.",
    )
    policy: TlsPolicy
    parameters: str = Field(default="", max_length=1000, description="Postfix TLS policy attributes, `name=value`.")
    justification: Text = Field(
        max_length=4000,
        description="Why mail needs this: at least `TLSO_JUSTIFICATION_MIN_LENGTH` visible characters. Zero-width "
        "spaces, bidi controls and other invisible characters are refused (ZWJ, ZWNJ, LRM, RLM and variation "
        "selectors are kept but not counted).",
    )
    ticket: Line | None = Field(default=None, max_length=200)
    ticket_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    duration: IsoDuration | None = Field(
        default=None,
        description=f"How long the override lasts, counted from when it is applied. {DURATION_RULES} "
        "Default `TLSO_DEFAULT_DURATION`, at most `TLSO_MAX_DURATION`.",
    )


def _visible(value: str) -> str:
    if not visible_length(value):
        raise ValueError("must say something visible")
    return value


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: Annotated[Text, AfterValidator(_visible)] = Field(
        min_length=1, max_length=4000, description="Why: every decision carries a comment."
    )

    @field_validator("comment")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # Stripped after the length check (pydantic's str_strip_whitespace strips before it, so 5,000 blanks
        # around one letter passed the documented 4,000): a comment of blanks counts as no comment.
        stripped = value.strip()
        if not stripped:
            raise ValueError("must not be blank")
        return stripped


class ExtendBody(ActionBody):
    duration: IsoDuration = Field(description=f"Added to the current expiry. {DURATION_RULES}")


class VoteRead(BaseModel):
    reviewer: str
    reviewer_name: str
    via: str | None
    decision: Literal["approve", "reject"]
    comment: str
    round: int = Field(description="0 = the request itself, n = the n-th extension.")
    at: datetime


class PendingExtension(BaseModel):
    duration: timedelta
    requested_by: str
    approvals: list[VoteRead]


class FindingRead(BaseModel):
    rule: str
    severity: str
    message: str
    refused: bool = False


class QueueReasonRead(BaseModel):
    reason: str = Field(description="Postfix's delay reason, as mailcow lists it (addresses replaced by `<…@domain>`).")
    recipients: int = Field(description="Deferred recipients at the destination with this reason.")
    failure_class: str | None = Field(description="The diagnosis's failure class it points at (dane.md §2.2), if any.")
    label: str | None = Field(description="What the reason means, in a few words.")
    tls: bool = Field(description="A TLS/DANE failure, the kind an override is for.")


class QueueEvidenceRead(BaseModel):
    """What mailcow's queue held deferred for the destination when last read: counts, reasons and times
    only, never addresses or senders."""

    destination: str
    checked_at: datetime
    attributable: bool = Field(
        description="False for a next hop (`[mx.example.org]:25`): the queue shows recipient domains, not next hops."
    )
    messages: int = Field(description="Deferred messages with at least one recipient at the destination.")
    recipients: int = Field(description="Their recipients at the destination.")
    oldest_arrival: datetime | None
    reasons: list[QueueReasonRead] = Field(description="Distinct delay reasons, most recipients first (at most 10).")
    capped: bool = Field(description="mailcow lists at most 10,000 queued messages: the counts may be higher.")
    error: str | None = Field(description="Why the queue could not be read (then there are no counts).")
    note: str | None = None
    line: str | None = Field(description='In one line: "14 messages to 9 recipients stuck for 3 h: …".')


class SummaryRead(BaseModel):
    """What a reviewer reads first (app/overrides/summary.py: the same line Slack and webhook events show)."""

    line: str = Field(
        description="One line: policy · verdict · what mail loses · whether it is weaker than recommended.",
        examples=[
            "none · blocked (A: TLSA mismatch) · plaintext always (TLS off) · weaker than the recommended fingerprint"
        ],
    )
    loses: list[str] = Field(
        description="What mail to the destination loses under the policy, compared with mailcow's default "
        "(e.g. `plaintext allowed`, `certificate not checked`); empty for a policy stricter than the default."
    )
    verdict: str | None = Field(
        description="The stored diagnosis' verdict (`blocked (A: TLSA mismatch)`); null "
        "without a diagnosis (a next hop, diagnosis off or failed)."
    )
    recommended: str | None = Field(description="The policy the diagnosis recommends, with its parameters.")
    weaker_than_recommended: bool | None = Field(
        description="Whether the requested policy is weaker than the recommended one; null without a recommendation."
    )
    stuck_mail: str | None = Field(
        default=None, description="Mail waiting in the queue for this destination, in one line; null when not known."
    )


class OverrideBrief(BaseModel):
    """An override as lists show it: the summary, the request, its state, findings and links; no diagnosis
    and no vote history (`GET /v1/overrides/{id}` or `?view=full` have them)."""

    summary: SummaryRead
    id: int
    target: str
    destination: str
    policy: str
    parameters: str
    justification: str
    ticket: str | None
    ticket_url: str | None
    duration: timedelta
    state: OverrideState
    requested_by: str
    requested_by_name: str
    requested_via: str | None
    approvals: list[VoteRead] = Field(description="Approving votes of the request round.")
    approvals_required: int
    created_at: datetime
    updated_at: datetime
    review_deadline: datetime | None
    applied_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    removal_deadline: datetime | None
    overdue: bool = Field(description="Still in mailcow (or not yet confirmed removed) past its removal deadline.")
    pending_extension: PendingExtension | None
    mailcow_id: int | None
    conflict: dict[str, Any] | None
    drift: dict[str, Any] | None
    last_error: str | None
    findings: list[FindingRead] = Field(description="What the checks found about the request (before the diagnosis).")
    still_stuck: bool = Field(
        description="Mail for the destination was still deferred with a TLS reason after the release: the "
        "override does not let it through."
    )
    version: int
    links: dict[str, str]


class OverrideRead(OverrideBrief):
    """An override in full: the brief view, then every vote and the diagnosis stored with the request."""

    votes: list[VoteRead] = Field(description="Every vote, all rounds, in order.")
    queue: QueueEvidenceRead | None = Field(
        description="The mail queue for the destination: read on create, refreshed while pending or active."
    )
    queue_release: dict[str, Any] | None = Field(
        description="The destination's deferred mail once the override is active: `status` `releasing` (being "
        "handed to mailcow), `released` (mailcow was asked to deliver `released` messages now), `clear` or "
        "`still_stuck` (the check `TLSO_QUEUE_CHECK_SECONDS` later, repeated every `TLSO_QUEUE_REFRESH_SECONDS` "
        "while active), `watching`/`watched` (after the end, for `TLSO_QUEUE_WATCH_SECONDS`: "
        "`failing` while mail for it defers for TLS again); counts, delay reasons and times only."
    )
    diagnosis: dict[str, Any] | None = Field(
        description="The diagnosis stored with the request (DNS, TLSA, each MX host's probe and certificates)."
    )


OverrideView = Literal["compact", "full"]


class OverridePage(BaseModel):
    items: list[OverrideRead | OverrideBrief] = Field(
        description="Brief items (`OverrideBrief`) by default; with `view=full`, the full override (`OverrideRead`)."
    )
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page.")


class ResolveConflictBody(ActionBody):
    action: Literal["replace", "abandon"] = Field(
        description="`replace`: delete the foreign row, apply the override, restore the row when it ends; "
        "`abandon`: the override fails and the foreign row stays."
    )
