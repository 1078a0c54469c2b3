"""A real OpenID provider for the tests: panva's `oidc-provider` (tests/oidc/provider.mjs) on loopback.

`oidc_provider` is a session-scoped fixture; `run_oidc_provider(...)` starts another instance with its own
settings (ES256, other users/clients/audience, or a restart with new keys). Register the fixture with
`from tests.oidc_provider import oidc_provider` in a conftest.py or a test module.

Without `node` (or without npm and tests/oidc/node_modules) the fixture skips, unless TLSO_REQUIRE_OIDC=1,
which turns that into a failure. A provider that does not start is always a failure.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

OIDC_DIR = Path(__file__).resolve().parent
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"

# The defaults of provider.mjs, mirrored for tests that want to refer to them.
DEFAULT_AUDIENCE = "http://127.0.0.1:8000"
DEFAULT_API_SCOPES = "api:read api:write"
DEFAULT_USER_SCOPES = "openid profile groups api:read api:write"
DEFAULT_USER_GROUPS: dict[str, list[str]] = {
    "alice": ["tlso-requesters"],
    "bob": ["tlso-approvers"],
    "carol": ["tlso-approvers"],
    "dave": ["tlso-admins"],
    "erin": ["tlso-auditors"],
}
DEFAULT_CLIENT_GROUPS: dict[str, list[str]] = {
    "svc-ticketing": ["tlso-integrations"],
    "svc-reader": ["tlso-auditors"],
    "svc-short": ["tlso-auditors"],  # its tokens expire after SHORT_TTL seconds
}
SHORT_TTL_CLIENT = "svc-short"
SHORT_TTL = 2
SWAGGER_CLIENT_ID = "swagger-ui"
DEFAULT_REDIRECT_URIS = [
    "http://127.0.0.1:8000/docs/oauth2-redirect",
    "http://localhost:8000/docs/oauth2-redirect",
]

STARTUP_TIMEOUT = 10.0
NPM_CI_TIMEOUT = 300.0


class OidcProviderUnavailable(RuntimeError):
    """node/npm are missing or the dependencies cannot be installed (an environment problem)."""


class OidcProviderError(RuntimeError):
    """The provider did not start, or refused a request."""


def default_secret(client_id: str) -> str:
    return f"{client_id}-secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _installed() -> bool:
    return (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").is_file()


@contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise `npm ci` between pytest processes (xdist workers, parallel runs) on this checkout."""
    key = hashlib.sha256(str(OIDC_DIR).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"tlso-oidc-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_node_modules() -> float | None:
    """Run `npm ci` in tests/oidc when its node_modules is missing; return the seconds it took (None: not needed)."""
    if shutil.which("node") is None:
        raise OidcProviderUnavailable("`node` is not on PATH (Node.js >= 20 runs the test OpenID provider)")
    if _installed():
        return None
    npm = shutil.which("npm")
    if npm is None:
        raise OidcProviderUnavailable("`npm` is not on PATH and tests/oidc/node_modules is missing")
    with _install_lock():
        if _installed():  # another process installed it while we waited
            return None
        started = time.monotonic()
        try:
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=OIDC_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OidcProviderUnavailable(f"`npm ci` in {OIDC_DIR} took longer than {NPM_CI_TIMEOUT:.0f} s") from exc
        if result.returncode != 0 or not _installed():
            raise OidcProviderUnavailable(
                f"`npm ci` in {OIDC_DIR} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return time.monotonic() - started


@dataclass
class TokenResponse:
    access_token: str
    expires_in: int
    scope: str | None
    id_token: str | None = None
    refresh_token: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class OidcProvider:
    """A running provider.mjs process and the flows the tests need against it."""

    def __init__(
        self,
        *,
        port: int,
        issuer: str,
        audience: str,
        alg: str,
        redirect_uris: Sequence[str],
        process: subprocess.Popen[bytes],
        log_path: Path,
    ) -> None:
        self.port = port
        self.issuer = issuer
        self.audience = audience
        self.alg = alg
        self.redirect_uris = list(redirect_uris)
        self.redirect_uri = self.redirect_uris[0]
        self.swagger_client_id = SWAGGER_CLIENT_ID
        self.process = process
        self.log_path = log_path
        self.discovery: dict[str, Any] = {}
        self.startup_seconds = 0.0

    # -- endpoints -------------------------------------------------------------------------------
    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return str(self.discovery.get("jwks_uri", f"{self.issuer}/jwks"))

    @property
    def token_url(self) -> str:
        return str(self.discovery.get("token_endpoint", f"{self.issuer}/token"))

    @property
    def authorization_url(self) -> str:
        return str(self.discovery.get("authorization_endpoint", f"{self.issuer}/auth"))

    @property
    def userinfo_url(self) -> str:
        return str(self.discovery.get("userinfo_endpoint", f"{self.issuer}/me"))

    def jwks(self) -> dict[str, Any]:
        response = httpx.get(self.jwks_url, timeout=5)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- lifecycle -------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                raise OidcProviderError(
                    f"provider.mjs exited with {self.process.returncode} before serving discovery:\n{self.log()}"
                )
            try:
                response = httpx.get(self.discovery_url, timeout=1)
                if response.status_code == 200:
                    self.discovery = response.json()
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OidcProviderError(f"provider.mjs did not serve discovery within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - started
        if self.discovery.get("issuer") != self.issuer:
            raise OidcProviderError(f"discovery says issuer {self.discovery.get('issuer')!r}, expected {self.issuer!r}")

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    # -- machine tokens (client_credentials) -----------------------------------------------------
    def client_credentials_response(
        self,
        client_id: str,
        secret: str | None = None,
        scope: str | None = DEFAULT_API_SCOPES,
        **extra: str,
    ) -> httpx.Response:
        """The raw token response (for negative tests: wrong secret, `resource=...` → invalid_target)."""
        data = {"grant_type": "client_credentials", **extra}
        if scope is not None:
            data["scope"] = scope
        return httpx.post(self.token_url, data=data, auth=(client_id, secret or default_secret(client_id)), timeout=10)

    def client_credentials(
        self, client_id: str, secret: str | None = None, scope: str | None = DEFAULT_API_SCOPES
    ) -> TokenResponse:
        return self._token_response(self.client_credentials_response(client_id, secret, scope))

    def client_credentials_token(
        self, client_id: str, secret: str | None = None, scope: str | None = DEFAULT_API_SCOPES
    ) -> str:
        """A JWT access token (typ at+jwt, aud = audience, `groups` of the client) for a machine client."""
        return self.client_credentials(client_id, secret, scope).access_token

    # -- user tokens (authorization code + PKCE through the devInteractions login) ----------------
    def user_tokens(self, username: str, scope: str = DEFAULT_USER_SCOPES, password: str = "any") -> TokenResponse:
        """Log `username` in as the public client (swagger-ui) would and redeem the code.

        devInteractions accepts any name and password; a name that is not a configured user gets no groups.
        """
        verifier, challenge = _pkce_pair()
        state = secrets.token_urlsafe(16)
        params = {
            "client_id": self.swagger_client_id,
            "response_type": "code",
            "redirect_uri": self.redirect_uri,
            "scope": scope,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
        }
        with httpx.Client(follow_redirects=False, timeout=10) as browser:
            response = browser.get(self.authorization_url, params=params)
            location = None
            for _ in range(10):
                if response.status_code not in (302, 303):
                    raise OidcProviderError(
                        f"login of {username!r}: unexpected {response.status_code} at {response.url}:\n"
                        f"{response.text[:2000]}"
                    )
                location = urljoin(str(response.url), response.headers["location"])
                if location.startswith(self.redirect_uri):
                    break
                if "/interaction/" in urlsplit(location).path:
                    page = browser.get(location)
                    if page.status_code != 200:
                        raise OidcProviderError(f"interaction page {location}: {page.status_code}\n{page.text[:2000]}")
                    if 'name="login"' in page.text:
                        form = {"prompt": "login", "login": username, "password": password}
                    else:
                        form = {"prompt": "consent"}
                    response = browser.post(location, data=form)
                else:
                    response = browser.get(location)
            else:
                raise OidcProviderError(f"login of {username!r} did not come back to {self.redirect_uri}")
        assert location is not None
        query = parse_qs(urlsplit(location).query)
        if "error" in query:
            raise OidcProviderError(f"authorization error for {username!r}: {query}")
        if query.get("state") != [state]:
            raise OidcProviderError(f"state mismatch in {location}")
        if query.get("iss", [self.issuer]) != [self.issuer]:
            raise OidcProviderError(f"iss mismatch in {location}")
        token = httpx.post(
            self.token_url,
            data={
                "grant_type": "authorization_code",
                "client_id": self.swagger_client_id,
                "redirect_uri": self.redirect_uri,
                "code": query["code"][0],
                "code_verifier": verifier,
            },
            timeout=10,
        )
        return self._token_response(token)

    def user_token(self, username: str, scope: str = DEFAULT_USER_SCOPES) -> str:
        """A JWT access token for `username` (sub, groups, name, preferred_username, client_id swagger-ui)."""
        return self.user_tokens(username, scope).access_token

    @staticmethod
    def _token_response(response: httpx.Response) -> TokenResponse:
        if response.status_code != 200:
            raise OidcProviderError(f"token endpoint answered {response.status_code}: {response.text}")
        data: dict[str, Any] = response.json()
        return TokenResponse(
            access_token=data["access_token"],
            expires_in=int(data["expires_in"]),
            scope=data.get("scope"),
            id_token=data.get("id_token"),
            refresh_token=data.get("refresh_token"),
            raw=data,
        )


@contextmanager
def run_oidc_provider(
    *,
    audience: str = DEFAULT_AUDIENCE,
    alg: str = "RS256",
    users: Mapping[str, Any] | None = None,
    clients: Mapping[str, Any] | None = None,
    redirect_uris: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[OidcProvider]:
    """Start provider.mjs on a free loopback port, wait for discovery, yield it, stop it.

    `users` / `clients` replace the defaults (see provider.mjs for the JSON shapes); `env` adds OIDC_* settings.
    Raises OidcProviderUnavailable when node/npm are missing and OidcProviderError when it does not start.
    """
    ensure_node_modules()
    node = shutil.which("node")
    assert node is not None
    uris = list(redirect_uris or DEFAULT_REDIRECT_URIS)
    owned_dir = None
    if log_dir is None:
        owned_dir = tempfile.TemporaryDirectory(prefix="tlso-oidc-")
        log_dir = Path(owned_dir.name)
    try:
        last_error: Exception | None = None
        for attempt in range(3):  # the free port may be taken between probing and node's bind
            port = _free_port()
            issuer = f"http://127.0.0.1:{port}"
            child_env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("OIDC_")},  # no leaks from the shell
                "OIDC_PORT": str(port),
                "OIDC_ISSUER": issuer,
                "OIDC_AUDIENCE": audience,
                "OIDC_ALG": alg,
                "OIDC_REDIRECT_URIS": json.dumps(uris),
                "OIDC_EXIT_ON_STDIN_EOF": "1",
                **(env or {}),
            }
            if users is not None:
                child_env["OIDC_USERS"] = json.dumps(users)
            if clients is not None:
                child_env["OIDC_CLIENTS"] = json.dumps(clients)
            log_path = log_dir / f"oidc-provider-{port}-{attempt}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [node, str(PROVIDER_SCRIPT)],
                    cwd=OIDC_DIR,
                    env=child_env,
                    stdin=subprocess.PIPE,  # never written; closing it (or our death) stops the provider
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            provider = OidcProvider(
                port=port,
                issuer=child_env["OIDC_ISSUER"],
                audience=child_env["OIDC_AUDIENCE"],
                alg=child_env["OIDC_ALG"],
                redirect_uris=uris,
                process=process,
                log_path=log_path,
            )
            try:
                provider.wait_ready(timeout)
            except OidcProviderError as exc:
                provider.stop()
                last_error = exc
                if "EADDRINUSE" in provider.log():
                    continue
                raise
            try:
                yield provider
            finally:
                provider.stop()
            return
        raise OidcProviderError(f"provider.mjs found no free port: {last_error}")
    finally:
        if owned_dir is not None:
            owned_dir.cleanup()


def require_oidc_provider() -> None:
    """Skip the calling test (fail it under TLSO_REQUIRE_OIDC=1) when node/npm cannot run the provider."""
    try:
        ensure_node_modules()
    except OidcProviderUnavailable as exc:
        if os.environ.get("TLSO_REQUIRE_OIDC") == "1":
            pytest.fail(f"TLSO_REQUIRE_OIDC=1 but the test OpenID provider cannot run: {exc}", pytrace=False)
        pytest.skip(f"test OpenID provider unavailable: {exc}")


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """The test OpenID provider with its default users and clients (one per test session)."""
    require_oidc_provider()
    with run_oidc_provider(log_dir=tmp_path_factory.mktemp("oidc")) as provider:
        yield provider
