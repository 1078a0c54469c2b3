"""A development identity provider, mounted only by `python -m app dev`.

It serves an OIDC discovery document and a JWKS under `/dev/` and mints signed tokens on
`POST /dev/token`, so dev mode exercises the same validation path as production. It is never
mounted by `serve`, and `dev` refuses to bind anything but loopback.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter
from joserfc import jwt
from joserfc.jwk import ECKey
from pydantic import BaseModel, Field

from app.core.config import ROLES, Role

DEV_AUDIENCE = "tlsoverride-dev"
DEV_ROLE_MAP: dict[str, list[Role]] = {role: [role] for role in ROLES}


class DevTokenRequest(BaseModel):
    sub: str = Field(min_length=1, max_length=200, examples=["alice"])
    name: str | None = Field(default=None, max_length=200, examples=["Alice Example"])
    roles: list[Role] = Field(default=["requester"], examples=[["requester"]])
    client_id: str | None = Field(default=None, description="Set for a machine client (e.g. an integration).")
    ttl_seconds: int = Field(default=3600, ge=1, le=86400)


class DevTokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 (a token type, not a secret)
    expires_in: int


class DevIdentityProvider:
    def __init__(self, issuer: str, audience: str = DEV_AUDIENCE) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.key = ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig"}, auto_kid=True)

    def mint(self, request: DevTokenRequest) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": request.sub,
            "name": request.name or request.sub,
            "roles": list(request.roles),
            "iat": now,
            "nbf": now,
            "exp": now + request.ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        if request.client_id:
            claims["client_id"] = request.client_id
        return jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": "at+jwt"}, claims, self.key)

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/dev", tags=["dev identity provider"])

        @router.get("/.well-known/openid-configuration", summary="Dev OIDC discovery")
        def discovery() -> dict[str, Any]:
            return {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/jwks",
                "token_endpoint": f"{self.issuer}/token",
                "id_token_signing_alg_values_supported": ["ES256"],
                "response_types_supported": ["token"],
                "subject_types_supported": ["public"],
            }

        @router.get("/jwks", summary="Dev signing keys")
        def jwks() -> dict[str, Any]:
            return {"keys": [self.key.as_dict(private=False)]}

        @router.post("/token", response_model=DevTokenResponse, summary="Mint a dev token (dev mode only)")
        def token(body: DevTokenRequest) -> DevTokenResponse:
            """Any identity, any roles: this exists only in `python -m app dev`."""
            return DevTokenResponse(access_token=self.mint(body), expires_in=body.ttl_seconds)

        return router
