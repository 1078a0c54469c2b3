"""The command line: dev mode runs the whole flow on loopback and refuses everything that could touch
production; the other commands answer as the README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.core.devidp import DevIdentityProvider
from app.main import create_app
from tests.helpers import free_port, make_settings

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TLSO_")}
    env.update(extra)
    return env


def _dev(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "dev", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        (["--host", "0.0.0.0"], {}, "bind to loopback"),
        (["--host", "192.0.2.10"], {}, "bind to loopback"),
        ([], {"TLSO_ENV": "production"}, "TLSO_ENV=production"),
        ([], {"TLSO_ENV": "test"}, "TLSO_ENV=test"),
        ([], {"TLSO_DATABASE_URL": "postgresql+psycopg://prod@db.example/tlso"}, "not a SQLite file"),
    ],
)
def test_dev_mode_refuses_what_could_reach_production(args: list[str], env: dict[str, str], reason: str) -> None:
    result = _dev(*args, "--port", str(free_port()), **env)
    assert result.returncode == 2, result.stderr
    assert "refusing to start dev mode" in result.stderr and reason in result.stderr


def test_the_dev_identity_provider_is_refused_in_production() -> None:
    settings = make_settings(env="production", oidc_issuer="https://idp.example.net/realms/mail")
    with pytest.raises(RuntimeError, match="never with TLSO_ENV=production"):
        create_app(settings, dev_idp=DevIdentityProvider(settings.oidc_issuer))


def test_dev_mode_runs_the_whole_flow(tmp_path: Path) -> None:
    """The README's "run" command: API + dev IdP + worker + mailcow stand-in, on a fresh SQLite file."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "dev.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "dev", "--port", str(port)],
        cwd=ROOT,
        env=_env(TLSO_DATABASE_URL=f"sqlite:///{tmp_path / 'dev.db'}"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            _wait_ready(http, process, tmp_path / "dev.log")

            def token(sub: str, role: str) -> dict[str, str]:
                answer = http.post("/dev/token", json={"sub": sub, "roles": [role]})
                assert answer.status_code == 200, answer.text
                return {"authorization": f"Bearer {answer.json()['access_token']}"}

            created = http.post(
                "/v1/overrides",
                headers=token("alice", "requester"),
                json={
                    "destination": "example.org",
                    "policy": "encrypt",
                    "justification": "TLSA stale since the renewal, OPS-1",
                    "duration": "PT1H",
                },
            )
            assert created.status_code == 201, created.text
            override_id = created.json()["id"]
            bob = token("bob", "approver")
            approved = http.post(f"/v1/overrides/{override_id}/approve", headers=bob, json={"comment": "ok"})
            assert approved.status_code == 200, approved.text
            state = ""
            for _ in range(50):
                state = http.get(f"/v1/overrides/{override_id}", headers=bob).json()["state"]
                if state == "active":
                    break
                time.sleep(0.1)
            assert state == "active"
            policies = http.get("/v1/targets/default/policies", headers=token("root", "admin")).json()
            assert [(row["dest"], row["owned_by"]) for row in policies["rows"]] == [("example.org", override_id)]
            assert http.get("/docs").status_code == 200
        key_file = tmp_path / "dev.db.audit-key.pem"  # dev mode signs audit checkpoints with a key of its own
        assert key_file.read_text().startswith("-----BEGIN PRIVATE KEY-----")
        assert key_file.stat().st_mode & 0o777 == 0o600
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _wait_ready(http: httpx.Client, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dev mode exited ({process.returncode}):\n{log.read_text()}")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"dev mode did not become ready:\n{log.read_text()}")


def test_openapi_check_says_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "openapi", "--check"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0 and "up to date" in (result.stdout + result.stderr)


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60
    )


def test_the_database_tools_need_only_the_database(tmp_path: Path) -> None:
    """`migrate` and `audit verify` run in production with nothing but TLSO_DATABASE_URL (no OIDC)."""
    url = f"sqlite:///{tmp_path / 'prod.db'}"
    migrated = _run("migrate", TLSO_DATABASE_URL=url)
    assert migrated.returncode == 0, migrated.stderr
    assert "database at revision" in migrated.stdout
    verified = _run("audit", "verify", TLSO_DATABASE_URL=url)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["valid"] is True


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_still_refuse_production_without_oidc(command: str, tmp_path: Path) -> None:
    result = _run(command, "--port", str(free_port())) if command == "serve" else _run(command)
    assert result.returncode == 2, result.stderr
    assert "TLSO_OIDC_ISSUER, TLSO_OIDC_AUDIENCE must be set outside dev mode" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_worker_refuses_production_without_an_audit_signing_key(tmp_path: Path) -> None:
    oidc = {"TLSO_OIDC_ISSUER": "https://idp.example.net/realms/mail", "TLSO_OIDC_AUDIENCE": "tlsoverride"}
    result = _run("worker", TLSO_DATABASE_URL=f"sqlite:///{tmp_path / 'prod.db'}", **oidc)
    assert result.returncode == 2
    assert "TLSO_AUDIT_SIGNING_KEY_FILE (or TLSO_AUDIT_SIGNING_KEY) must be set outside dev mode" in result.stderr
