"""Who may do what to an override: seeing it, the role each action needs, the version it must be at,
and the refusals on record. Every action loads its override through `load_for_action`."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Engine, bindparam, or_
from sqlmodel import Session, col

from app.audit.refusals import record_refusal
from app.core.auth import Principal
from app.core.config import Role, Settings
from app.core.errors import Forbidden, NotFound, PreconditionFailed, PreconditionRequired
from app.core.idempotency import Idempotency
from app.overrides.lifecycle import load
from app.overrides.models import Override, Vote
from app.overrides.reads import Answered


@dataclass(frozen=True)
class ActionContext:
    """What every action needs: who, with what version precondition and Idempotency-Key, and where to log
    refusals."""

    principal: Principal
    settings: Settings
    engine: Engine
    if_match: str | None = None
    session: Session | None = None  # the request's own, ended before a refusal is recorded
    idempotency: Idempotency | None = None
    # An override's votes as this request left them, when it loaded them under the override's lock (a
    # vote does): its answer needs no second look. Keyed by the override's id.
    votes: dict[int, list[Vote]] = field(default_factory=dict)

    def claim(self, session: Session) -> None:
        """Claim the request's Idempotency-Key in the change's own transaction, right before the change
        (raises `Replay` when a request with the key already has its answer)."""
        if self.idempotency is not None:
            self.idempotency.claim(session)


def refuse(ctx: ActionContext, override_id: int | None, action: str, reason: str) -> Forbidden:
    """Record a refused authorisation (in its own transaction: the request's own is rolled back)."""
    if ctx.session is not None:
        # It would be rolled back anyway; end it first, because on SQLite it holds the only write lock
        # and the refusal's transaction would wait for it until the busy timeout (then fail: a 500).
        ctx.session.rollback()
    record_refusal(
        ctx.engine,
        ctx.settings,
        actor=ctx.principal.actor,
        via=ctx.principal.via,
        override_id=override_id,
        after={"attempted": action, "roles": sorted(ctx.principal.roles)},
        comment=reason,
    )
    return Forbidden(reason)


def can_see(principal: Principal, override: Answered) -> bool:
    """Reviewers, admins and auditors see every override; anyone else the ones they asked for, and an
    integration (acting for a user or as itself) also the ones submitted through it."""
    if principal.sees_all or override.requested_by_key == principal.key:
        return True
    return principal.follows is not None and override.requested_via == principal.follows


def visible_to(principal: Principal) -> tuple[ColumnElement[bool] | None, dict[str, str]]:
    """`can_see` as a query condition (None: everything) and its parameters: the condition names the
    caller's values as required parameters (`me`, `via`), so one statement serves every caller alike."""
    if principal.sees_all:
        return None, {}
    mine = col(Override.requested_by_key) == bindparam("me", required=True)
    if principal.follows is None:
        return mine, {"me": principal.key}
    return or_(mine, col(Override.requested_via) == bindparam("via", required=True)), {
        "me": principal.key,
        "via": principal.follows,
    }


def asked_for_it(principal: Principal, override: Override) -> bool:
    """Whether the caller is the person who asked for the override or for its pending extension."""
    askers = {override.requested_by_key, override.extension_requested_by_key if override.extension_round else None}
    return principal.key in askers


def _check_version(ctx: ActionContext, override: Override) -> None:
    if ctx.if_match is None:
        if ctx.settings.require_if_match:
            raise PreconditionRequired("Send If-Match with the override's ETag.")
        return
    # The tag names a version, not a byte representation, so `W/"2"` counts as `"2"`: reverse proxies
    # that compress answers (nginx gzip) weaken ETags on the way out, and clients send them back so.
    wanted = {tag.strip().removeprefix("W/").strip('"') for tag in ctx.if_match.split(",")}
    if "*" not in wanted and str(override.version) not in wanted:
        raise PreconditionFailed(
            f"The override is at version {override.version}; reload it and decide again.",
        )


@dataclass(frozen=True)
class Permission:
    """Who may do something to an override: one of `roles`, or (`or_owner`) the person who asked for it."""

    roles: tuple[Role, ...]
    to: str  # what the refusal says the caller cannot do: "decide on requests"
    or_owner: bool = False

    def allows(self, principal: Principal, override: Override) -> bool:
        return principal.has(*self.roles) or (self.or_owner and override.requested_by_key == principal.key)

    def refusal(self, principal: Principal) -> str:
        return principal.lacks(*self.roles, to=self.to, or_owner=self.or_owner)


REVIEW = Permission(("approver", "admin"), "decide on requests")
CANCEL = Permission(("admin",), "cancel an override", or_owner=True)
EXTEND = Permission(("admin",), "ask to extend an override", or_owner=True)
REVOKE = Permission(("admin",), "revoke an override")
RESOLVE_CONFLICT = Permission(("admin",), "resolve a conflict")


def load_visible(session: Session, principal: Principal, override_id: int) -> Override:
    """The override, if the caller may see it (else: it does not exist, as far as they can tell)."""
    override = load(session, override_id)
    if not can_see(principal, override):
        raise NotFound(f"Override {override_id} does not exist.")
    return override


def load_for_action(
    session: Session, ctx: ActionContext, override_id: int, action: str, permission: Permission
) -> Override:
    """The override, locked, once the caller may see it, may do `action` on it, and decided on its
    current version — in that order, so a refused caller learns nothing more and is always on record."""
    ctx.claim(session)
    override = load(session, override_id, for_update=True)
    if not can_see(ctx.principal, override):
        refuse(ctx, override.id, action, f"{action} on an override the caller may not see")
        raise NotFound(f"Override {override_id} does not exist.")
    if not permission.allows(ctx.principal, override):
        raise refuse(ctx, override.id, action, permission.refusal(ctx.principal))
    _check_version(ctx, override)
    return override
