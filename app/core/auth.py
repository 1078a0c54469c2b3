"""OIDC bearer-token validation and the caller's roles.

Tokens are JWTs checked with joserfc (authlib's JOSE implementation): signature against the issuer's
JWKS (discovered, cached, refetched on an unknown `kid` at most every few seconds and at the latest when
it is `TLSO_OIDC_JWKS_MAX_AGE_SECONDS` old), an algorithm allow-list (never `none`, never HMAC), exact
`iss`, `aud`, `exp` and `nbf` with a small leeway.

A token that passed is remembered (`ValidatedTokens`) so that its next requests skip the signature
check, only until its `exp` (plus the leeway, as the full check allows) and only while the JWKS it was
checked against is the current one: a refresh of the JWKS forgets every remembered token, so a key
removed from the JWKS stops validating at the next refresh, exactly as without the cache. Roles are
read from the token's claims, so a changed role takes effect with the caller's next token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Protocol
from urllib.parse import quote

import httpx
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2AuthorizationCodeBearer
from fastapi.security.utils import get_authorization_scheme_param
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from app.core.config import ROLES, Role, Settings
from app.core.errors import Forbidden, InvalidInput, ServiceUnavailable, Unauthenticated
from app.core.person import RESERVED_KEYS, person_key
from app.core.text import HEADER_ENCODING, decode_header_text, parse_id, text_problem

log = logging.getLogger("app.auth")

ON_BEHALF_OF = "X-On-Behalf-Of"
ON_BEHALF_OF_NAME = "X-On-Behalf-Of-Name"


@dataclass(frozen=True)
class Principal:
    """Who is acting: the human (`actor`, as the token or the integration named them) and, for
    integrations, the machine client (`via`)."""

    actor: str
    name: str
    roles: frozenset[Role]
    via: str | None = None
    client_id: str | None = None
    # Set when the roles come from naming a user (`X-On-Behalf-Of`): the roles of the integration's own
    # token. The delegated roles let it act for that user; what it reads is its own (see `sees_all`).
    token_roles: frozenset[Role] | None = None

    @property
    def delegated(self) -> bool:
        return self.token_roles is not None

    @cached_property
    def key(self) -> str:
        """The person as compared with others (app/core/person.py)."""
        return person_key(self.actor)

    def has(self, *roles: Role) -> bool:
        return bool(self.roles.intersection(roles))

    @property
    def sees_all(self) -> bool:
        """Whether the caller reads every override: a reviewer, admin or auditor by their own token (or by
        the Slack user map); an integration only if its own token says so, never by the user it names."""
        own = self.roles if self.token_roles is None else self.token_roles
        return bool(own.intersection(("approver", "admin", "auditor")))

    @property
    def follows(self) -> str | None:
        """The integration whose submissions the caller reads (overrides with `requested_via` = it): the
        client itself, with or without `X-On-Behalf-Of`; None for people."""
        if self.delegated:
            return self.via
        return self.via if "integration" in self.roles else None

    @property
    def sees(self) -> str:
        """Which overrides the caller reads, in words (for `GET /v1/me`)."""
        if self.sees_all:
            return "all overrides"
        mine = f"overrides requested by {self.actor}"
        return f"{mine} and overrides submitted through {self.follows}" if self.follows else mine

    def lacks(self, *roles: Role, to: str, or_owner: bool = False) -> str:
        """The detail of a refused role check: who the caller is, the roles they have and the one they lack
        (nothing else: not whether the override exists, not what the token says besides)."""
        who = f"{self.actor} via {self.via}" if self.via else self.actor
        have = ", ".join(sorted(self.roles)) or "none"
        need = f"the role {roles[0]}" if len(roles) == 1 else f"one of the roles {', '.join(roles)}"
        owner = "is not the requester and " if or_owner else ""
        return f"{who} (roles: {have}) {owner}lacks {need} to {to}."


@dataclass
class _JwksCache:
    keys: KeySet | None = None
    attempted_at: float = -1e9  # the last fetch, successful or not (monotonic clock)
    fetched_at: float = -1e9  # the last successful fetch (monotonic clock)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ValidatedTokens:
    """Tokens that passed the full check, with the claims they carried: at most `size` of them (the least
    recently used go first). The key is the whole token (header, payload and signature: a signature glued to
    another header or payload is another token). An entry holds only while the token is unexpired (`exp` +
    leeway, on the wall clock, as the full check has it) and the JWKS it was checked against is still the
    current one (the same `KeySet` object)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[float, KeySet, dict[str, Any]]] = OrderedDict()

    def get(self, token: str, keys: KeySet) -> dict[str, Any] | None:
        found = self._items.get(token)
        if found is None:
            return None
        until, checked_with, claims = found
        if checked_with is not keys or time.time() >= until:
            del self._items[token]
            return None
        self._items.move_to_end(token)
        return claims

    def put(self, token: str, keys: KeySet, until: float, claims: dict[str, Any]) -> None:
        if self.size <= 0:
            return
        self._items[token] = (until, keys, claims)
        self._items.move_to_end(token)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class TokenValidator:
    """Validates bearer tokens against one issuer."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http
        self._jwks_uri: str | None = None
        self._cache = _JwksCache()
        self.validated = ValidatedTokens(settings.oidc_token_cache_size)
        # The caller each validated token names without X-On-Behalf-Of: a function of the token's claims alone
        # (and the settings), so it is looked up by the token, after the token passed `validate` again.
        self._principals: OrderedDict[str, Principal] = OrderedDict()

    def principal(self, token: str, claims: dict[str, Any]) -> Principal:
        """`principal_from_claims(claims, ...)` without delegation headers, for the token `claims` came from
        (just validated), made once per token while it is among the most recently used."""
        found = self._principals.get(token)
        if found is None:
            found = principal_from_claims(claims, self.settings, [], [])
            if self.validated.size > 0:
                self._principals[token] = found
                while len(self._principals) > self.validated.size:
                    self._principals.popitem(last=False)
        else:
            self._principals.move_to_end(token)
        return found

    async def _discover(self) -> str:
        if self._jwks_uri is None:
            response = await self.http.get(self.settings.discovery_url)
            response.raise_for_status()
            doc = response.json()
            if doc.get("issuer") != self.settings.oidc_issuer:
                raise ServiceUnavailable("OIDC discovery names another issuer than TLSO_OIDC_ISSUER")
            self._jwks_uri = str(doc["jwks_uri"])
        return self._jwks_uri

    async def _keys(self, kid: str | None) -> KeySet:
        """The issuer's keys; fetched again for an unknown `kid`, at most once per
        `TLSO_OIDC_JWKS_MIN_REFRESH_SECONDS` — also while the provider fails, so forged kids cannot make
        us hammer it. Tokens with a known kid never wait for a fetch."""
        cache = self._cache
        known = cache.keys is not None and (kid is None or _has_kid(cache.keys, kid))
        if known and cache.keys is not None and (not self._too_old(cache) or cache.lock.locked()):
            return cache.keys  # fresh, or another request is refreshing it right now
        async with cache.lock:  # one fetch at a time; the others see its result
            if cache.keys is not None and (kid is None or _has_kid(cache.keys, kid)) and not self._too_old(cache):
                return cache.keys
            # Without any keys, look again sooner (the provider may just be starting).
            pause = self.settings.oidc_jwks_min_refresh_seconds if cache.keys is not None else 2.0
            if time.monotonic() - cache.attempted_at >= pause:
                cache.attempted_at = time.monotonic()
                try:
                    response = await self.http.get(await self._discover())
                    response.raise_for_status()
                    cache.keys = KeySet.import_key_set(response.json())
                    cache.fetched_at = cache.attempted_at
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    log.warning("cannot fetch the issuer's keys: %s", exc)
            if cache.keys is None:
                raise ServiceUnavailable("The identity provider's keys cannot be fetched.")
            return cache.keys

    def _too_old(self, cache: _JwksCache) -> bool:
        """Whether the keys are due for a refresh (a key the provider removed must stop validating)."""
        return time.monotonic() - cache.fetched_at >= self.settings.oidc_jwks_max_age_seconds

    def _remembered(self, token: str) -> dict[str, Any] | None:
        """The claims of a token that passed the full check, if the keys it was checked against are the ones
        `_keys` would answer with now without a fetch (the token's key id is among them: it passed)."""
        cache = self._cache
        if cache.keys is None or (self._too_old(cache) and not cache.lock.locked()):
            return None
        return self.validated.get(token, cache.keys)

    async def validate(self, token: str) -> dict[str, Any]:
        remembered = self._remembered(token)
        if remembered is not None:
            return dict(remembered)
        settings = self.settings
        try:
            header = extract_compact(token.encode()).protected
        except (JoseError, ValueError, UnicodeError) as exc:
            raise Unauthenticated("The bearer token is not a valid JWT.") from exc
        alg = header.get("alg")
        if alg not in settings.oidc_algorithms:
            raise Unauthenticated(f"Token algorithm {alg!r} is not allowed.")
        kid = header.get("kid")
        keys = await self._keys(kid if isinstance(kid, str) else None)
        if isinstance(kid, str) and not _has_kid(keys, kid):
            raise Unauthenticated("The token was signed with an unknown key.")
        try:
            decoded = jwt.decode(token, keys, algorithms=settings.oidc_algorithms)
            jwt.JWTClaimsRegistry(
                leeway=settings.oidc_leeway_seconds,
                iss={"essential": True, "value": settings.oidc_issuer},
                aud={"essential": True, "value": settings.oidc_audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(f"The bearer token was rejected: {exc}") from exc
        claims = dict(decoded.claims)
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            self.validated.put(token, keys, float(exp) + settings.oidc_leeway_seconds, claims)
        return dict(claims)


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)


def roles_from_claims(claims: dict[str, Any], settings: Settings) -> frozenset[Role]:
    value: Any = claims
    for part in settings.oidc_roles_claim.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    groups = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    roles: set[Role] = set()
    for group in groups:
        for role in settings.oidc_role_map.get(str(group), []):
            if role in ROLES:
                roles.add(role)
    return frozenset(roles)


def _claim(claims: dict[str, Any], name: str) -> str | None:
    """A string claim that names someone or something, held to the text rules of every other input."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Unauthenticated(f"The token's '{name}' claim is not a string.")
    problem = text_problem(value, one_line=True)
    if problem:
        raise Unauthenticated(f"The token's '{name}' claim {problem}.")
    return value


def _header(header: str, values: list[str]) -> str:
    if len(values) > 1:
        raise InvalidInput.on(f"header.{header}", f"{header} must be sent once")
    try:
        return decode_header_text(values[0]).strip()
    except ValueError as exc:
        raise InvalidInput.on(f"header.{header}", f"{header} {exc}") from exc


def _person_problem(name: str) -> str | None:
    """Why `name` cannot name a person (or None)."""
    key = person_key(name)
    if not name.strip() or not key:
        return "names nobody (it is empty or only invisible characters and marks)"
    if len(name) > 200 or len(key) > 200:
        return "is longer than 200 characters"
    if key in RESERVED_KEYS:
        return f"'{name}' is reserved for tlsoverride itself"
    return None


def principal_from_claims(
    claims: dict[str, Any], settings: Settings, on_behalf_of: list[str], on_behalf_name: list[str]
) -> Principal:
    """The caller: a bad identity in the token is a 401, a bad identity header a 422 naming it."""
    roles = roles_from_claims(claims, settings)
    sub = _claim(claims, "sub") or ""
    problem = _person_problem(sub)
    if problem:
        raise Unauthenticated(f"The token's subject {problem}.")
    client_id = _claim(claims, "client_id") or _claim(claims, "azp")
    client_id = client_id[:200] if client_id else None
    name = (_claim(claims, "name") or _claim(claims, "preferred_username") or sub)[:200]
    # An integration is recorded `via` its client also when it acts as itself: what it submits is
    # `requested_via` it, which is how it finds its own requests again.
    itself = client_id or sub if "integration" in roles else None
    if not on_behalf_of:
        return Principal(actor=sub, name=name, roles=roles, via=itself, client_id=client_id)
    if "integration" not in roles:
        caller = Principal(actor=sub, name=name, roles=roles, client_id=client_id)
        raise Forbidden(caller.lacks("integration", to=f"send {ON_BEHALF_OF}"))
    user = _header(ON_BEHALF_OF, on_behalf_of)
    problem = _person_problem(user)
    if problem:
        raise InvalidInput.on(f"header.{ON_BEHALF_OF}", f"{ON_BEHALF_OF} {problem}")
    shown = _header(ON_BEHALF_OF_NAME, on_behalf_name) if on_behalf_name else user
    if not shown or len(shown) > 200:
        raise InvalidInput.on(f"header.{ON_BEHALF_OF_NAME}", f"{ON_BEHALF_OF_NAME} must be 1 to 200 characters")
    return Principal(
        actor=user,
        name=shown,
        roles=frozenset(settings.integration_delegated_roles),
        via=itself,
        client_id=client_id,
        token_roles=roles,
    )


# Swagger UI shows both: the OIDC login (authorization code + PKCE) and a pasted bearer token.
def oauth2_scheme(settings: Settings) -> OAuth2AuthorizationCodeBearer:
    issuer = settings.oidc_issuer.rstrip("/")
    return OAuth2AuthorizationCodeBearer(
        authorizationUrl=settings.oidc_authorization_url or f"{issuer}/auth",
        tokenUrl=settings.oidc_token_url or f"{issuer}/token",
        scopes={scope: scope for scope in settings.oidc_swagger_scopes.split()},
        scheme_name="oidc",
        auto_error=False,
    )


bearer_scheme = HTTPBearer(scheme_name="bearer", auto_error=False, description="Paste an access token.")


def _header_doc(what: str) -> str:
    return f"{what} Encoding: {HEADER_ENCODING}"


OnBehalfOf = Annotated[
    str | None,
    Header(
        alias=ON_BEHALF_OF,
        description=_header_doc(
            "Integrations only: the user the call is made for (up to 200 characters). The call then acts "
            "with the roles in `TLSO_INTEGRATION_DELEGATED_ROLES` as that user; any other caller gets 403. "
            "People are compared by a canonical key, so `ALİCE`, `Alice` and `alice` are one person."
        ),
    ),
]
OnBehalfOfName = Annotated[
    str | None,
    Header(
        alias=ON_BEHALF_OF_NAME,
        description=_header_doc(
            f"With `{ON_BEHALF_OF}`: that user's display name (1 to 200 characters; default: the "
            f"`{ON_BEHALF_OF}` value). Ignored without it."
        ),
    ),
]


async def caller(request: Request) -> Principal:
    """The caller, from the request's `Authorization` header (a bearer token, read as `bearer_scheme` reads
    it) and identity headers (every occurrence: a repeated header is refused)."""
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("A bearer token is required.")
    validator: TokenValidator = request.app.state.token_validator
    claims = await validator.validate(token)
    headers = request.headers
    if ON_BEHALF_OF not in headers and ON_BEHALF_OF_NAME not in headers:
        return validator.principal(token, claims)
    try:
        return principal_from_claims(
            claims, validator.settings, headers.getlist(ON_BEHALF_OF), headers.getlist(ON_BEHALF_OF_NAME)
        )
    except Forbidden as exc:
        if request.method not in {"GET", "HEAD", "OPTIONS"}:  # an attempted action: on record, like any refusal
            await _record_refusal(request, claims, exc)
        raise


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    on_behalf_of: OnBehalfOf = None,
    on_behalf_of_name: OnBehalfOfName = None,
) -> Principal:
    """The caller (`caller`). The token and the identity headers are parameters so that every authenticated
    route documents them; `caller` reads them from the request, and the API's routes run it in this one's
    place (app/core/routes.py)."""
    return await caller(request)


class RecordRefusal(Protocol):
    """Puts a refused attempt on record in its own transaction (`create_app` hands it over as
    `app.state.record_refusal`: the audit trail is a layer above this one)."""

    def __call__(
        self, *, actor: str, via: str | None, override_id: int | None, after: dict[str, Any], comment: str | None
    ) -> None: ...


async def _record_refusal(request: Request, claims: dict[str, Any], exc: Forbidden) -> None:
    from starlette.concurrency import run_in_threadpool

    record: RecordRefusal = request.app.state.record_refusal
    await run_in_threadpool(
        record,
        actor=str(claims["sub"]),
        via=None,
        override_id=parse_id(str(request.path_params.get("override_id", ""))),
        after={
            "attempted": f"{request.method} {request.url.path}",
            "on_behalf_of": _as_sent(request.headers.get(ON_BEHALF_OF) or "")[:200],
        },
        comment=exc.detail,
    )


def _as_sent(value: str) -> str:
    """A header for the record: its text if it is acceptable, else as sent with every byte that is not
    printable ASCII percent-encoded."""
    try:
        return decode_header_text(value)
    except ValueError:
        return quote(value.encode("latin-1"), safe=_PRINTABLE_ASCII)


_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Any:
    """A dependency that lets the call through only for one of `roles`."""

    async def _check(request: Request, principal: CurrentPrincipal) -> Principal:
        if not principal.has(*roles):
            route = getattr(request.scope.get("route"), "path", request.url.path)
            raise Forbidden(principal.lacks(*roles, to=f"{request.method} {route}"))
        return principal

    return Depends(_check)
