"""Typed settings from `TLSO_*` environment variables, validated at start-up."""

from __future__ import annotations

import json
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.durations import parse_duration

Role = Literal["requester", "approver", "admin", "auditor", "integration"]
ROLES: tuple[Role, ...] = ("requester", "approver", "admin", "auditor", "integration")

DEFAULT_ROLE_MAP: dict[str, list[Role]] = {
    "tlso-requesters": ["requester"],
    "tlso-approvers": ["approver", "requester"],
    "tlso-admins": ["admin"],
    "tlso-auditors": ["auditor"],
    "tlso-integrations": ["integration"],
}

# Approvals a policy needs by default; one for any policy not named (`Settings.approvals_for`).
DEFAULT_APPROVALS: dict[str, int] = {"none": 2}


class CoreSettings(BaseSettings):
    """What every command needs — the database, logging, the audit trail's keys. The database tools
    (`migrate`, `audit …`) read only these, so they run without the API's OIDC settings."""

    model_config = SettingsConfigDict(env_prefix="TLSO_", extra="ignore")

    env: Literal["dev", "test", "production"] = "production"
    database_url: str = "sqlite:///./var/tlsoverride.db"
    log_level: str = "INFO"
    log_json: bool = True

    # audit trail: checkpoints of the chain head signed with this Ed25519 key (PEM or base64 of the
    # 32-byte private key); public keys (base64 or PEM) trusted besides it, e.g. the ones before a rotation.
    audit_signing_key: SecretStr | None = None
    audit_signing_key_file: Path | None = None
    audit_public_keys: Annotated[list[str], NoDecode] = []
    audit_checkpoint_every_events: int = Field(default=100, ge=1)
    audit_checkpoint_interval_seconds: float = Field(default=600.0, gt=0)
    # Refusals of one caller on one override and action: this many are recorded in full per window,
    # the rest counted and recorded as one summary row when the window ends (0 s: every one in full).
    audit_refusal_window_seconds: float = Field(default=300.0, ge=0)
    audit_refusals_per_window: int = Field(default=3, ge=1)

    @field_validator("audit_public_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [p.strip() for p in value.split(",") if p.strip()]
        return value

    @property
    def audit_signing_key_text(self) -> str | None:
        return read_secret(self.audit_signing_key, self.audit_signing_key_file)


class Settings(CoreSettings):
    """Every setting of the service; the README lists them all."""

    # OIDC
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_discovery_url: str = ""  # default: {issuer}/.well-known/openid-configuration
    oidc_algorithms: Annotated[list[str], NoDecode] = ["RS256", "ES256", "PS256", "EdDSA"]
    oidc_leeway_seconds: int = 30
    oidc_jwks_min_refresh_seconds: int = 30
    oidc_jwks_max_age_seconds: int = Field(default=300, ge=1)
    oidc_token_cache_size: int = Field(default=10_000, ge=0)
    oidc_roles_claim: str = "groups"
    oidc_role_map: Annotated[dict[str, list[Role]], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_ROLE_MAP))
    oidc_authorization_url: str = ""  # default: {issuer}/auth (Swagger UI login)
    oidc_token_url: str = ""  # default: {issuer}/token
    oidc_swagger_client_id: str = "swagger-ui"
    oidc_swagger_scopes: str = "openid profile groups"
    # Sent with Swagger UI's login: `login` makes the provider ask who is there every time, so that after
    # Swagger's logout the next person logs in instead of the provider's session logging the last one back in.
    oidc_swagger_prompt: str = "login"
    integration_delegated_roles: Annotated[list[Role], NoDecode] = ["requester", "approver"]
    # Approvals one integration may carry per request (and per extension round): it can name any user,
    # so a quorum of two needs a second reviewer acting directly or through another integration.
    integration_approvals_per_round: int = Field(default=1, ge=1)

    # Override rules
    default_target: str = "default"
    approvals_required: Annotated[dict[str, int], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_APPROVALS))
    auto_approve_policies: Annotated[list[str], NoDecode] = []
    default_duration: timedelta = timedelta(days=7)
    max_duration: timedelta = timedelta(days=30)
    review_window: timedelta = timedelta(days=2)
    justification_min_length: int = 20
    require_if_match: bool = False
    idempotency_ttl: timedelta = timedelta(hours=24)
    brief_cache_size: int = Field(default=10_000, ge=0)  # encoded list items kept (app/overrides/briefs.py)

    # mailcow targets: the default one from URL + key (or key file); more as JSON
    # {"name": {"url": "...", "api_key_file": "..."}}
    mailcow_url: str = ""
    mailcow_api_key: SecretStr | None = None
    mailcow_api_key_file: Path | None = None
    mailcow_targets: Annotated[dict[str, dict[str, str]], NoDecode] = {}
    mailcow_timeout_seconds: float = 10.0
    mailcow_supports_subdomain_dest: bool = False

    # worker
    worker_poll_seconds: float = 5.0
    worker_lease_seconds: float = 60.0
    reconcile_interval_seconds: float = 300.0
    drift_action: Literal["alert", "reapply"] = "alert"
    removal_grace_seconds: float = 300.0
    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    apply_max_attempts: int = 20
    worker_batch_size: int = Field(default=50, ge=1, le=1000)  # overrides claimed per job and tick
    worker_concurrency: int = Field(default=8, ge=1, le=64)  # parallel mailcow calls per target
    worker_id: str = Field(default="", max_length=60)  # lease owner name; default host:pid:random
    worker_metrics_port: int | None = None  # a standalone worker serves /metrics here (else: multiprocess dir)
    worker_metrics_host: str = "127.0.0.1"  # ... on this address (plain HTTP, no authentication)
    metrics_public: bool = False  # /metrics without a token (a scraper on a private network)
    mailcow_attempts: int = Field(default=3, ge=1, le=10)  # HTTP attempts per mailcow call (5xx, timeouts)
    mailcow_retry_backoff_seconds: float = 0.2  # first pause between those attempts (doubling, at most 10x)
    # After a 401/403 the target is not called again for this long (fail2ban bans after 10 in 10 min).
    mailcow_auth_backoff_seconds: float = 900.0
    # An add whose answer was lost (a timeout) may still be committed by mailcow this long after it was
    # sent; a removal that finds nothing of ours waits that long before it records the end.
    mailcow_add_settle_seconds: float = Field(default=60.0, ge=0)
    # mailcow's queue (app/worker/release.py): once an override is active its destination's deferred mail is
    # delivered at once, by queue id, this many ids per call; a check this long afterwards flags an override
    # whose mail is still deferred for TLS; after the end the destination is watched this long.
    queue_release_batch: int = Field(default=100, ge=1, le=1000)
    queue_check_seconds: float = Field(default=60.0, ge=0)
    queue_watch_seconds: float = Field(default=86400.0, ge=0)
    # The mail queue (mailcow-api.md §12): a new request reads it within this budget (0: not on create), and
    # the worker reads it again for pending and active overrides every so often (0: never).
    queue_evidence_budget_seconds: float = Field(default=2.0, ge=0, le=30)
    queue_refresh_seconds: float = Field(default=300.0, ge=0)

    # diagnosis
    dns_resolver: str | None = None
    dns_selftest_name: str = "."  # a name known to be signed; its DNSKEY must validate (AD=1)
    smtp_port: int = 25
    diagnosis_timeout_seconds: float = 5.0
    diagnosis_allow_reserved: bool = False
    diagnosis_concurrency: int = 8
    diagnosis_rate_per_minute: int = 30
    diagnosis_on_create: bool = True
    recheck_interval_seconds: float = Field(default=3600.0, ge=0)  # re-diagnosis of each active override
    remediation_checks: int = Field(default=3, ge=1)  # clean results in a row that mean "recipient fixed"
    remediation: Literal["end", "notify", "off"] = "notify"  # off: the worker does not re-diagnose
    refuse_rules: Annotated[list[str], NoDecode] = ["policy_useless"]

    # Where clients reach the API (`https://tlso.example.com`): the absolute links of webhook events and
    # Slack messages are built on it. Required in production once a sink or Slack is configured.
    public_base_url: str = ""

    # notifications (app/notify/sinks.py): {"name": {"url": "...", "secret_file": "...", "format": "json|slack",
    # "events": ["override.*"], "requested_via": "client-id"}}
    notify_webhooks: Annotated[dict[str, dict[str, Any]], NoDecode] = {}
    notify_max_attempts: int = Field(default=10, ge=1, le=100)  # per event and sink, then a dead letter

    # Slack (app/slack/): the app's signing secret turns /slack/* on; the bot token is optional (chat.postMessage
    # and chat.update for `format: slack` sinks that name a channel); users: {"U0123": "alice"} or
    # {"U0123": {"person": "alice", "roles": ["approver"]}}.
    slack_signing_secret: SecretStr | None = None
    slack_signing_secret_file: Path | None = None
    slack_bot_token: SecretStr | None = None
    slack_bot_token_file: Path | None = None
    slack_users: Annotated[dict[str, Any], NoDecode] = {}
    slack_team_id: str = ""  # when set, requests from any other workspace are refused
    slack_api_url: str = "https://slack.com/api/"  # GovSlack: https://slack-gov.com/api/

    @field_validator(
        "oidc_algorithms",
        "auto_approve_policies",
        "integration_delegated_roles",
        "refuse_rules",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "oidc_role_map", "approvals_required", "mailcow_targets", "notify_webhooks", "slack_users", mode="before"
    )
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value)
        return value

    @field_validator("default_duration", "max_duration", "review_window", "idempotency_ttl", mode="before")
    @classmethod
    def _strict_duration(cls, value: Any) -> Any:
        # ISO 8601 by the API's rules (no months or years, no bare `T`), or a number of seconds (the README
        # promises both; pydantic alone takes neither rule from an environment variable's text).
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            return timedelta(seconds=int(value.strip()))
        if isinstance(value, str) and value.strip().lstrip("-")[:1] in {"P", "p"}:
            return parse_duration(value.strip())
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _no_weak_algorithms(cls, value: list[str]) -> list[str]:
        bad = [alg for alg in value if alg.lower() == "none" or alg.upper().startswith("HS")]
        if bad:
            raise ValueError(f"refusing token algorithms {bad}: only asymmetric signatures are accepted")
        if not value:
            raise ValueError("at least one token algorithm is required")
        return value

    @model_validator(mode="after")
    def _production_is_configured(self) -> Settings:
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("TLSO_OIDC_ISSUER", self.oidc_issuer),
                    ("TLSO_OIDC_AUDIENCE", self.oidc_audience),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"{', '.join(missing)} must be set outside dev mode")
            if self.oidc_issuer.startswith("http://") and not _is_loopback_url(self.oidc_issuer):
                raise ValueError("TLSO_OIDC_ISSUER must use https outside loopback")
            if (self.notify_webhooks or self.slack_enabled) and not self.public_base_url:
                # A receiver cannot follow a relative link: refuse rather than send events nobody can act on.
                raise ValueError("TLSO_PUBLIC_BASE_URL must be set when webhooks or Slack are configured")
        if self.public_base_url:
            self.public_base_url = _base_url(self.public_base_url)
        if self.default_duration > self.max_duration:
            raise ValueError("TLSO_DEFAULT_DURATION exceeds TLSO_MAX_DURATION")
        return self

    @property
    def discovery_url(self) -> str:
        return self.oidc_discovery_url or f"{self.oidc_issuer.rstrip('/')}/.well-known/openid-configuration"

    def approvals_for(self, policy: str) -> int:
        return max(1, self.approvals_required.get(policy, 1))

    def target_names(self) -> list[str]:
        """Every mailcow target an override may name: the default one first."""
        return [self.default_target, *[name for name in self.mailcow_targets if name != self.default_target]]

    @property
    def slack_enabled(self) -> bool:
        return self.slack_signing_secret is not None or self.slack_signing_secret_file is not None

    def link(self, path: str) -> str:
        """An absolute URL of `path` on this service (relative without TLSO_PUBLIC_BASE_URL: dev and tests)."""
        return f"{self.public_base_url}{path}"


def _base_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("TLSO_PUBLIC_BASE_URL must be an http(s) URL without query or fragment")
    return value.strip().rstrip("/")


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1"}


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret from a `*_FILE` path when given, else from the variable itself."""
    if file is not None:
        return file.read_text(encoding="utf-8").strip()
    return value.get_secret_value() if value is not None else None


@lru_cache
def get_settings() -> Settings:
    return Settings()


@lru_cache
def get_core_settings() -> CoreSettings:
    return CoreSettings()
