"""A development identity provider, mounted only by `python -m app dev`.

It serves an OIDC discovery document and a JWKS under `/dev/` and mints signed tokens, so dev mode
exercises the same validation path as production:

* `POST /dev/token` with a JSON body: any identity, any roles (curl, scripts);
* Swagger UI's "Authorize": `GET /dev/auth` shows a login page (a name and roles, no password), its
  form posts back to `/dev/auth`, which redirects to Swagger UI's own redirect page with a code; the
  page redeems it at `POST /dev/token` (`grant_type=authorization_code`, PKCE S256). A code is good
  once, for `CODE_TTL_SECONDS`, and only with the redirect URI and the verifier of its request.

It is never mounted by `serve` (`create_app` refuses it under TLSO_ENV=production), and `dev` refuses
to bind anything but loopback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from joserfc import jwt
from joserfc.jwk import ECKey
from pydantic import BaseModel, Field, ValidationError

from app.core.config import ROLES, Role
from app.core.errors import PROBLEM_JSON, TYPE_BASE, InvalidInput, MalformedBody

DEV_AUDIENCE = "tlsoverride-dev"
DEV_ROLE_MAP: dict[str, list[Role]] = {role: [role] for role in ROLES}
DEV_CLIENT_ID = "swagger-ui"  # Swagger UI's client id (TLSO_OIDC_SWAGGER_CLIENT_ID's default)
REDIRECT_PATH = "/docs/oauth2-redirect"
CODE_TTL_SECONDS = 60
LOGIN_TOKEN_TTL_SECONDS = 3600
FORM = "application/x-www-form-urlencoded"

# The login page runs no script and loads nothing; its form posts to this origin only.
LOGIN_PAGE_POLICY = "default-src 'none'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


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


@dataclass(frozen=True)
class AuthorizationRequest:
    """What Swagger UI asked `/dev/auth` for, checked."""

    client_id: str
    redirect_uri: str
    state: str | None
    code_challenge: str


@dataclass(frozen=True)
class _Code:
    request: AuthorizationRequest
    identity: DevTokenRequest
    expires_at: float  # monotonic clock


class AuthorizationRefused(Exception):
    """A refused authorization or token request: `error` is the OAuth 2 error code (RFC 6749 §4.1.2.1, §5.2)."""

    def __init__(self, error: str, description: str, field: str) -> None:
        super().__init__(description)
        self.error, self.description, self.field = error, description, field


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of a code verifier (RFC 7636 §4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class DevIdentityProvider:
    def __init__(self, issuer: str, audience: str = DEV_AUDIENCE, *, client_id: str = DEV_CLIENT_ID) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.client_id = client_id
        self.key = ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig"}, auto_kid=True)
        issuer_url = urlsplit(self.issuer)
        # Swagger UI's redirect page of this very app: the only place a code is ever sent.
        self.redirect_uri = f"{issuer_url.scheme}://{issuer_url.netloc}{REDIRECT_PATH}"
        self._codes: dict[str, _Code] = {}
        self._lock = threading.Lock()

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

    # -- authorization code + PKCE (Swagger UI's "Authorize") -----------------------------------------
    def check_authorization(self, params: dict[str, str]) -> AuthorizationRequest:
        """The request's parameters, or AuthorizationRefused (never a redirect to an unchecked URI)."""
        if params.get("client_id") != self.client_id:
            raise AuthorizationRefused("unauthorized_client", f"client_id must be {self.client_id!r}", "client_id")
        if params.get("redirect_uri") != self.redirect_uri:
            raise AuthorizationRefused(
                "invalid_request", f"redirect_uri must be this app's Swagger UI: {self.redirect_uri}", "redirect_uri"
            )
        if params.get("response_type") != "code":
            raise AuthorizationRefused("unsupported_response_type", "response_type must be 'code'", "response_type")
        challenge = params.get("code_challenge", "")
        if params.get("code_challenge_method") != "S256" or not 43 <= len(challenge) <= 128:
            raise AuthorizationRefused(
                "invalid_request",
                "PKCE is required: a code_challenge with code_challenge_method S256",
                "code_challenge",
            )
        state = params.get("state")
        return AuthorizationRequest(self.client_id, self.redirect_uri, state[:1000] if state else None, challenge)

    def issue_code(self, request: AuthorizationRequest, identity: DevTokenRequest) -> str:
        code = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [key for key, held in self._codes.items() if held.expires_at <= now]:
                del self._codes[old]
            self._codes[code] = _Code(request, identity, now + CODE_TTL_SECONDS)
        return code

    def redeem(self, params: dict[str, str]) -> DevTokenResponse:
        """A token for a code: once, in time, for its client and redirect URI, with the verifier of its challenge."""
        if params.get("grant_type") != "authorization_code":
            raise AuthorizationRefused(
                "unsupported_grant_type", "grant_type must be 'authorization_code' (or send JSON)", "grant_type"
            )
        with self._lock:  # taken out whatever follows: a code is never good twice
            held = self._codes.pop(params.get("code", ""), None)
        if held is None or held.expires_at <= time.monotonic():
            raise AuthorizationRefused("invalid_grant", "the code is unknown, used or expired", "code")
        if params.get("client_id", held.request.client_id) != held.request.client_id:
            raise AuthorizationRefused("invalid_grant", "the code was issued to another client", "client_id")
        if params.get("redirect_uri") != held.request.redirect_uri:
            raise AuthorizationRefused(
                "invalid_grant", "redirect_uri differs from the authorization request's", "redirect_uri"
            )
        verifier = params.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(s256(verifier), held.request.code_challenge):
            raise AuthorizationRefused(
                "invalid_grant", "code_verifier does not match the code_challenge", "code_verifier"
            )
        identity = held.identity.model_copy(update={"ttl_seconds": LOGIN_TOKEN_TTL_SECONDS})
        return DevTokenResponse(access_token=self.mint(identity), expires_in=LOGIN_TOKEN_TTL_SECONDS)

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/dev", tags=["dev identity provider"])

        @router.get("/.well-known/openid-configuration", summary="Dev OIDC discovery")
        def discovery() -> dict[str, Any]:
            return {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/jwks",
                "authorization_endpoint": f"{self.issuer}/auth",
                "token_endpoint": f"{self.issuer}/token",
                "id_token_signing_alg_values_supported": ["ES256"],
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "code_challenge_methods_supported": ["S256"],
                "subject_types_supported": ["public"],
            }

        @router.get("/jwks", summary="Dev signing keys")
        def jwks() -> dict[str, Any]:
            return {"keys": [self.key.as_dict(private=False)]}

        @router.get("/auth", summary="Dev login page (Swagger UI's Authorize)", response_class=HTMLResponse)
        def login_page(request: Request) -> HTMLResponse:
            """Pick a name and roles; no password (dev mode only)."""
            params = dict(request.query_params)
            try:
                checked = self.check_authorization(params)
            except AuthorizationRefused as exc:
                raise InvalidInput.on(f"query.{exc.field}", exc.description) from exc
            return HTMLResponse(login_html(checked))

        @router.post("/auth", summary="Dev login: redirect to Swagger UI with a code", include_in_schema=False)
        async def login(request: Request) -> RedirectResponse:
            form = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
            params = dict(form)
            try:
                checked = self.check_authorization(params)
            except AuthorizationRefused as exc:
                raise InvalidInput.on(f"body.{exc.field}", exc.description) from exc
            try:
                identity = DevTokenRequest.model_validate(
                    {
                        "sub": params.get("sub", "").strip(),
                        "name": params.get("name", "").strip() or None,
                        "roles": [value for key, value in form if key == "roles"],
                    }
                )
            except ValidationError as exc:
                raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
            answer = {"code": self.issue_code(checked, identity), "iss": self.issuer}
            if checked.state is not None:
                answer["state"] = checked.state
            return RedirectResponse(f"{checked.redirect_uri}?{urlencode(answer)}", status_code=303)

        @router.post(
            "/token",
            response_model=DevTokenResponse,
            summary="Mint a dev token (dev mode only)",
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": DevTokenRequest.model_json_schema()},
                        FORM: {
                            "schema": {
                                "type": "object",
                                "required": ["grant_type", "code", "redirect_uri", "code_verifier"],
                                "properties": {
                                    name: {"type": "string"}
                                    for name in ("grant_type", "code", "redirect_uri", "code_verifier", "client_id")
                                },
                            }
                        },
                    },
                }
            },
        )
        async def token(request: Request) -> Any:
            """JSON: any identity, any roles. Form (`grant_type=authorization_code`): redeem a login's code
            with its PKCE verifier, as Swagger UI does. Both exist only in `python -m app dev`."""
            body = await request.body()
            if request.headers.get("content-type", "").split(";")[0].strip().lower() == FORM:
                try:
                    return self.redeem(dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)))
                except AuthorizationRefused as exc:
                    return _token_error(exc, request.url.path)
            try:
                wanted = DevTokenRequest.model_validate_json(body or b"{}")
            except ValidationError as exc:
                invalid = [e for e in exc.errors() if e["type"] == "json_invalid"]
                if invalid:
                    reason = (invalid[0].get("ctx") or {}).get("error", "it cannot be parsed")
                    raise MalformedBody(f"The body is not valid JSON: {reason}.") from exc
                raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
            return DevTokenResponse(access_token=self.mint(wanted), expires_in=wanted.ttl_seconds)

        return router


def _token_error(exc: AuthorizationRefused, path: str) -> JSONResponse:
    """A problem document that OAuth clients read too: `error` and `error_description` (RFC 6749 §5.2)."""
    problem = InvalidInput.on(f"body.{exc.field}", exc.description).problem(path).model_dump(exclude_none=True)
    problem.update(
        type=TYPE_BASE + "oauth-token-request",
        title="The token request is refused",
        status=400,
        error=exc.error,
        error_description=exc.description,
    )
    return JSONResponse(problem, status_code=400, media_type=PROBLEM_JSON)


def login_html(request: AuthorizationRequest) -> str:
    """The login form: hidden fields carry the checked request back; no script, no style."""
    carried = {
        "response_type": "code",
        "client_id": request.client_id,
        "redirect_uri": request.redirect_uri,
        "code_challenge": request.code_challenge,
        "code_challenge_method": "S256",
        **({"state": request.state} if request.state is not None else {}),
    }
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value, quote=True)}">'
        for name, value in carried.items()
    )
    roles = "\n".join(
        f'<label><input type="checkbox" name="roles" value="{role}"{" checked" if role == "requester" else ""}> '
        f"{role}</label><br>"
        for role in ROLES
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>tlsoverride — dev login</title></head>
<body>
<h1>tlsoverride dev login</h1>
<p>Dev mode only: anyone on this host may log in as anyone, with any roles.</p>
<form method="post" action="/dev/auth">
{hidden}
<p><label>User <input name="sub" value="alice" required maxlength="200" autofocus></label></p>
<p><label>Display name <input name="name" maxlength="200"></label></p>
<fieldset><legend>Roles</legend>
{roles}
</fieldset>
<p><button type="submit">Log in</button></p>
</form>
</body>
</html>
"""
