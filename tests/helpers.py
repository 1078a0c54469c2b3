"""Small helpers shared by the tests (imported by name; fixtures live in conftest.py files and plugins):
settings and requests as the tests make them, problem assertions, audit reads, row counts, worker steps."""

from __future__ import annotations

import base64
import socket
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine

from app.audit.signing import PublicKey, trusted_keys
from app.core.config import Settings
from app.core.db import transaction, utcnow
from app.core.devidp import DEV_AUDIENCE, DEV_ROLE_MAP
from app.core.threaded_server import ThreadedServer
from app.overrides import lifecycle
from app.overrides.models import Override, OverrideState

PROBLEM_JSON = "application/problem+json"
COMMENT = {"comment": "Checked the diagnosis and the ticket."}


def assert_problem(response: httpx.Response, status: int, *, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with `status` (and, if given, an error naming `field`)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://") and body["title"]
    if field is not None:
        fields = [error["field"] for error in body.get("errors") or []]
        assert field in fields, body
        assert all(error["message"] for error in body["errors"])
    return body


def counts(engine: Engine) -> dict[str, int]:
    """Rows per table that a refused request must leave alone."""
    with engine.connect() as conn:
        return {
            table: int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("override", "vote", "audit_event", "idempotency_record")
        }


def audit_rows(engine: Engine, action: str | None = None) -> list[dict[str, Any]]:
    """Audit events straight from the table, oldest first."""
    query = "SELECT seq, actor, via, action, override_id, comment FROM audit_event"
    params: dict[str, Any] = {}
    if action is not None:
        query += " WHERE action = :action"
        params["action"] = action
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text(query + " ORDER BY seq"), params)]


def events(client: Any, override_id: int, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get(f"/v1/overrides/{override_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


def act(client: Any, override_id: int, action: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    response: httpx.Response = client.post(
        f"/v1/overrides/{override_id}/{action}", json={**COMMENT, **body}, headers=headers
    )
    return response


def load(engine: Engine, override_id: int) -> Override:
    with transaction(engine) as session:
        return lifecycle.load(session, override_id)


def worker_step(engine: Engine, override_id: int, to: OverrideState, action: str, **changes: Any) -> Override:
    """What the worker does: one table-checked, compare-and-set transition in its own transaction."""
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        return lifecycle.transition(session, override, to, actor="worker", action=action, changes=changes or None)


def apply_now(engine: Engine, override_id: int, mailcow_id: int = 7) -> Override:
    """The worker applied an approved override: the clock starts now."""
    now = utcnow()
    override = load(engine, override_id)
    return worker_step(
        engine,
        override_id,
        OverrideState.active,
        "override.applied",
        applied_at=now,
        expires_at=now + timedelta(seconds=override.duration_seconds),
        mailcow_id=mailcow_id,
    )


# The API, the stand-in and webhook receivers under a real uvicorn (the same class dev mode uses).
LiveServer = ThreadedServer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------------------------
# Settings and requests as the tests make them

# Tests sign audit checkpoints with a key of their own (dev mode makes one beside its database).
AUDIT_SIGNING_KEY = base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()
ISSUER = "http://testserver/dev"
Headers = dict[str, str]

VALID_REQUEST: dict[str, Any] = {
    "destination": "example.org",
    "policy": "encrypt",
    "justification": "Recipient TLSA records are stale after a certificate renewal.",
    "ticket": "OPS-1",
    "duration": "P3D",
}


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "database_url": "sqlite://",
        "oidc_issuer": ISSUER,
        "oidc_audience": DEV_AUDIENCE,
        "oidc_roles_claim": "roles",
        "oidc_role_map": DEV_ROLE_MAP,
        "oidc_algorithms": ["ES256"],
        "audit_signing_key": AUDIT_SIGNING_KEY,
        "justification_min_length": 20,
        "log_json": False,
        # Diagnosis on create would reach the real DNS; the diagnosis tests turn it on against the lab.
        "diagnosis_on_create": False,
        # The worker's remediation watch would too; tests/worker/test_recheck.py runs it against the lab.
        "remediation": "off",
        # So would reading mailcow's queue on create and refreshing it; the queue tests turn them on.
        "queue_evidence_budget_seconds": 0.0,
        "queue_refresh_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


def audit_keys() -> dict[str, PublicKey]:
    """The public keys that verify the checkpoints the tests' settings sign."""
    return trusted_keys(make_settings())


def lab_settings(lab: Any, **overrides: Any) -> Settings:
    """Settings that point the diagnosis at the DNSSEC/SMTP lab (tests/lab)."""
    values: dict[str, Any] = {
        "dns_resolver": lab.resolver,
        "smtp_port": lab.smtp_port,
        "diagnosis_allow_reserved": True,
        "dns_selftest_name": "test.",
        "diagnosis_timeout_seconds": 3.0,
    }
    return make_settings(**{**values, **overrides})
