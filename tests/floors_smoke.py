"""Smoke test for the dependency floors (run by .ci/floors.py in a venv holding exactly the lowest
versions pyproject.toml allows, from a directory outside the source tree; not collected by pytest).

It imports the installed package, migrates a SQLite file with `python -m app migrate`, builds the app
and sends requests through TestClient: a create must be committed *before* its answer is sent (the
request session's `Depends(..., scope="function")`, new in FastAPI 0.121; with scope "request" the
commit would come after the answer, and this check fails).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def main() -> int:
    import app

    here = Path.cwd().resolve()
    assert "site-packages" in app.__file__, f"app imported from the source tree: {app.__file__}"
    with tempfile.TemporaryDirectory(prefix="tlso-smoke-") as tmp:
        database = Path(tmp) / "smoke.db"
        env = {**os.environ, "TLSO_ENV": "test", "TLSO_DATABASE_URL": f"sqlite:///{database}"}
        subprocess.run([sys.executable, "-m", "app", "migrate"], check=True, env=env, cwd=here)
        committed_before_answer = _one_request_through_the_app(database)
    assert committed_before_answer, "the create was committed after its answer was sent"
    _signatures()
    print("smoke: import, migrate, create_app, POST /v1/overrides committed before the answer: ok")
    print("smoke: a webhook signed as the notifier signs verifies; Slack's documented example verifies: ok")
    return 0


def _signatures() -> None:
    """The notifier's Standard Webhooks signature and slack_sdk's verifier work at the floor versions."""
    import base64
    from datetime import UTC, datetime

    from slack_sdk.signature import Clock, SignatureVerifier
    from standardwebhooks.webhooks import Webhook

    from app.notify.service import signature

    secret = "whsec_" + base64.b64encode(b"f" * 32).decode()
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_1_x",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature([secret], "msg_1_x", now, '{"a":1}'),
    }
    assert Webhook(secret).verify('{"a":1}', headers) == {"a": 1}

    class At(Clock):
        def now(self) -> float:
            return 1531420618.0

    body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&" + (
        "channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url="
        "https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id="
        "398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    signed = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert SignatureVerifier("8f742231b10e8888abcd99yyyzzz85a5", clock=At()).is_valid(body, "1531420618", signed)


def _one_request_through_the_app(database: Path) -> bool:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.core.devidp import DEV_AUDIENCE, DEV_ROLE_MAP, DevIdentityProvider, DevTokenRequest
    from app.main import create_app

    issuer = "http://testserver/dev"
    settings = Settings(
        env="test",
        database_url=f"sqlite:///{database}",
        oidc_issuer=issuer,
        oidc_audience=DEV_AUDIENCE,
        oidc_roles_claim="roles",
        oidc_role_map=DEV_ROLE_MAP,
        oidc_algorithms=["ES256"],
        diagnosis_on_create=False,
        log_json=False,
    )
    idp = DevIdentityProvider(issuer)
    app = create_app(settings, dev_idp=idp)
    seen: dict[str, Any] = {}

    async def watch_commit(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """When the create's answer starts, look at the database from another connection."""

        async def checking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and scope.get("method") == "POST":
                with sqlite3.connect(database) as conn:
                    seen["rows"] = conn.execute("SELECT count(*) FROM override").fetchone()[0]
            await send(message)

        await app(scope, receive, checking_send)

    token = idp.mint(DevTokenRequest(sub="alice", name="Alice", roles=["requester"]))
    with TestClient(watch_commit) as client:  # type: ignore[arg-type]
        created = client.post(
            "/v1/overrides",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "destination": "example.org",
                "policy": "encrypt",
                "justification": "Recipient TLSA records are stale after a certificate renewal.",
                "duration": "P3D",
            },
        )
        assert created.status_code == 201, created.text
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
    return bool(seen.get("rows") == 1)


if __name__ == "__main__":
    raise SystemExit(main())
