"""`GET /v1/me`: who the API takes the caller for — the first thing to ask when an answer is a 403 or a
list looks empty."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.core.auth import CurrentPrincipal
from app.core.config import Role
from app.core.errors import problem_responses

router = APIRouter(prefix="/v1", tags=["identity"])


class MeRead(BaseModel):
    actor: str = Field(description="Who acts: the token's subject, or the user an integration names in X-On-Behalf-Of.")
    name: str = Field(description="The display name (the token's `name`, or X-On-Behalf-Of-Name).")
    person_key: str = Field(description="The key people are compared by (no self-approval, ownership).")
    roles: list[Role] = Field(description="The roles this call acts with (sorted).")
    via: str | None = Field(
        description="The integration's client id for integrations (acting for a user or as "
        "themselves); null for people."
    )
    on_behalf_of: bool = Field(
        description="Whether the roles come from X-On-Behalf-Of "
        "(`TLSO_INTEGRATION_DELEGATED_ROLES`) rather than from the token."
    )
    sees: str = Field(description="Which overrides this caller reads, in words.")


@router.get(
    "/me",
    response_model=MeRead,
    summary="Who am I",
    responses=problem_responses(401, 422),
)
def read_me(principal: CurrentPrincipal) -> MeRead:
    """The caller as this API sees them, for every authenticated caller (no role needed: it tells a caller
    without roles why everything else is a 403)."""
    return MeRead(
        actor=principal.actor,
        name=principal.name,
        person_key=principal.key,
        roles=sorted(principal.roles),
        via=principal.via,
        on_behalf_of=principal.delegated,
        sees=principal.sees,
    )
