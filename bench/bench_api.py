"""Benchmark: the API against a bare FastAPI endpoint, page latency at 1 k / 100 k / 1 M rows, and the
audit trail's verification and export rates.

Everything is measured in one run on this machine, in production mode:

* the API is `python -m app serve` (TLSO_ENV=production, default log level) on PostgreSQL, with RS256
  tokens checked against a JWKS that a static issuer started by this script serves (discovery + JWKS,
  tokens minted with joserfc); diagnosis on create is off;
* the yardstick is a bare FastAPI app with one `async def` returning a constant, served by the same
  `uvicorn.run(...)` call as `cmd_serve` (same settings, same logging set-up) and loaded by the same
  `wrk` with the same connection counts right after each cell (on a shared machine the load moves
  within minutes); every request rate is printed as a ratio to it; `--rounds N` measures each cell
  (and the yardstick after it) N times and shows the round of the median ratio, with every round's;
* the `floor-write` row is a second yardstick, not tlsoverride: the same bare app's `GET /write`, one
  durable INSERT of a small row as the create writes (prepared, autocommit, a pool as large as the
  API's) and nothing else, as a ratio to the constant: how much of the create's budget this machine's
  commit alone takes;
* page latency: each list page (filters: state, ticket, destination, requester, target; the audit
  page) with 1 k, 100 k and 1 M overrides and as many audit rows, seeded in SQL (`generate_series`,
  realistic spreads of states, destinations, tickets, requesters and targets) and, for the audit
  trail, a valid hash chain computed in Python and COPYed in (the verify step proves it valid); each
  page is measured in two interleaved rounds and the better median counts;
* audit verification (`GET /v1/audit/verify`) and export (`GET /v1/audit/export`) in rows/s.

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (started as `.ci/run` does if it is not running,
and stopped again) and `wrk` (Debian package: `apt-get install wrk`). `--profile ROW` also needs
py-spy (`pip install py-spy`, any venv) and records that row's API process.

    .venv/bin/python bench/bench_api.py                  # everything (~15 min on 2 cores)
    .venv/bin/python bench/bench_api.py --quick          # shorter runs, sizes 1 k and 100 k
    .venv/bin/python bench/bench_api.py --only requests --clients 1,32 --duration 5
    .venv/bin/python bench/bench_api.py --only requests --rows create --rounds 3   # a ratio that moves ±8 %
    .venv/bin/python bench/bench_api.py --only pages,audit --sizes 1000,1000000
    .venv/bin/python bench/bench_api.py --only requests --rows list-pending --profile list-pending
    .venv/bin/python bench/bench_api.py --only pages,audit --sizes 1000000 --keep 1000000   # seed 1 M once

Each size gets its own database (`tlso_bench_api_<size>`; `TLSO_BENCH_DB_PREFIX` replaces `tlso_bench_api`, so that
two runs on one server do not drop each other's), dropped at the end unless `--keep` names it;
a kept database is reused by the next run with `--keep` (upgraded by the migrations, not reseeded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("TLSO_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = os.environ.get("TLSO_BENCH_DB_PREFIX", "tlso_bench_api")
AUDIENCE = "tlsoverride-bench"
GENESIS_HASH = "0" * 64
TARGETS = (("default", 0.80), ("mx2", 0.15), ("mx3", 0.05))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------------------
# A static OpenID issuer: discovery + JWKS over HTTP, tokens minted here


class Issuer:
    def __init__(self) -> None:
        from joserfc.jwk import RSAKey

        self.key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        documents = {
            "/.well-known/openid-configuration": {"issuer": self.url, "jwks_uri": f"{self.url}/jwks"},
            "/jwks": {"keys": [self.key.as_dict(private=False)]},
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                document = documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def mint(self, sub: str, *groups: str) -> str:
        from joserfc import jwt

        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": sub,
            "name": sub.title(),
            "groups": list(groups),
            "iat": now,
            "exp": now + 6 * 3600,
        }
        token: str = jwt.encode({"alg": "RS256", "kid": self.key.kid, "typ": "at+jwt"}, claims, self.key)
        return token

    def stop(self) -> None:
        self.server.shutdown()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: the server (as .ci/run starts it) and one database per size


@contextlib.contextmanager
def postgres_server() -> Iterator[None]:
    def ready() -> bool:
        return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False).returncode == 0

    if ready():
        yield
        return
    version = sorted(os.listdir("/etc/postgresql"))[0]
    print(f"starting PostgreSQL {version}", file=sys.stderr)
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
    for _ in range(60):
        if ready():
            break
        time.sleep(0.5)
    try:
        yield
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop"], check=False)


def admin_url(database: str) -> str:
    return re.sub(r"/[^/]*$", f"/{database}", PG_ADMIN)


def seeded_rows(name: str) -> int:
    """The audit rows of a kept database `name` (0 if there is none)."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            return 0
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin_url(name)) as conn:
        row = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
        return int(row[0]) if row else 0
    return 0


@contextlib.contextmanager
def bench_database(name: str, keep: bool = False) -> Iterator[str]:
    """A database built by the migrations; with `keep` it is not dropped at the end, and a kept one is
    upgraded (new migrations, new indexes) and reused as it is."""
    url = admin_url(name)
    if not (keep and seeded_rows(name)):
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    sys.path.insert(0, str(REPO_ROOT))
    from app.core.db import make_engine
    from app.core.migrations import upgrade

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        if not keep:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------------------
# Seeding: overrides and votes in SQL, the audit chain computed here and COPYed

STATE_SPREAD = """
    CASE
      WHEN r < 0.55 THEN 'expired' WHEN r < 0.65 THEN 'revoked' WHEN r < 0.70 THEN 'rejected'
      WHEN r < 0.75 THEN 'cancelled' WHEN r < 0.78 THEN 'lapsed' WHEN r < 0.80 THEN 'remediated'
      WHEN r < 0.81 THEN 'failed' WHEN r < 0.93 THEN 'active' WHEN r < 0.94 THEN 'removing'
      WHEN r < 0.95 THEN 'approved' ELSE 'pending' END
"""
LIVE_STATES = "('pending', 'approved', 'active', 'removing')"
APPLIED_STATES = "('active', 'removing', 'expired', 'revoked', 'remediated')"


def seed_overrides(conn: psycopg.Connection[Any], count: int) -> None:
    """`count` overrides: ~80 % ended, 12 % active, 5 % pending; a destination has ~4 past overrides;
    ~3 per ticket (20 % none); 200 requesters, a few of them busy; 80/15/5 % over three targets.
    Live rows get a destination of their own (one live override per target and destination)."""
    conn.execute("SELECT setseed(0.42)")
    conn.execute(
        f"""
        INSERT INTO override (id, target, destination, policy, parameters, justification, ticket, duration_seconds,
            state, live, version, requested_by, requested_by_key, requested_by_name, approvals_required, created_at,
            updated_at, review_deadline, applied_at, expires_at, ended_at, end_reason, extension_round, attempts,
            clean_checks)
        SELECT g, tgt, CASE WHEN st IN {LIVE_STATES} THEN 'live' || g || '.example'
                            ELSE 'd' || (g % greatest({count} / 4, 1)) || '.example' END,
               CASE WHEN r2 < 0.7 THEN 'encrypt' WHEN r2 < 0.9 THEN 'may' ELSE 'dane' END, '',
               'Recipient TLSA records are stale after a certificate renewal (benchmark).',
               CASE WHEN r2 < 0.2 THEN NULL ELSE 'OPS-' || (g % greatest({count} / 3, 1)) END,
               604800, st, st IN {LIVE_STATES}, 3, 'user' || floor(200 * r3 * r3)::int,
               'user' || floor(200 * r3 * r3)::int, 'User ' || floor(200 * r3 * r3)::int, 1, at,
               at + interval '1 hour', at + interval '2 days',
               CASE WHEN st IN {APPLIED_STATES} THEN at + interval '1 hour' END,
               CASE WHEN st IN {APPLIED_STATES} THEN at + interval '7 days' END,
               CASE WHEN st IN ('expired', 'revoked', 'remediated', 'rejected', 'cancelled', 'lapsed', 'failed')
                    THEN at + interval '7 days' END,
               CASE WHEN st IN ('expired', 'revoked', 'remediated') THEN st END, 0, 0, 0
        FROM (
            SELECT g, r2, r3, {STATE_SPREAD} AS st,
                   CASE WHEN r4 < {TARGETS[0][1]} THEN '{TARGETS[0][0]}'
                        WHEN r4 < {TARGETS[0][1] + TARGETS[1][1]} THEN '{TARGETS[1][0]}'
                        ELSE '{TARGETS[2][0]}' END AS tgt,
                   timestamp '2024-01-01' + (g * interval '1 minute') AS at
            FROM (SELECT g, random() AS r, random() AS r2, random() AS r3, random() AS r4
                  FROM generate_series(1, {count}) AS g) AS raw
        ) AS spread
        """
    )
    conn.execute("SELECT setval(pg_get_serial_sequence('override', 'id'), (SELECT max(id) FROM override))")
    # One approval for every override that went past review; a second for some.
    conn.execute(
        """
        INSERT INTO vote (override_id, round, reviewer, reviewer_key, reviewer_name, decision, comment, created_at)
        SELECT id, 0, 'reviewer' || (id % 20), 'reviewer' || (id % 20), 'Reviewer',
               CASE WHEN state = 'rejected' THEN 'reject' ELSE 'approve' END,
               'checked the diagnosis', created_at + interval '30 minutes'
        FROM override WHERE state NOT IN ('pending', 'cancelled', 'lapsed')
        """
    )
    conn.execute("ANALYZE override")
    conn.execute("ANALYZE vote")


def add_pending_pool(conn: psycopg.Connection[Any], count: int) -> int:
    """`count` fresh pending overrides (by alice) for the approve rows, with consecutive ids from the
    table's sequence (the API is idle meanwhile); returns the first id."""
    sequence = "pg_get_serial_sequence('override', 'id')"
    first: int = conn.execute(f"SELECT nextval({sequence})").fetchone()[0]  # type: ignore[index]
    conn.execute(f"SELECT setval({sequence}, %s)", (first + count - 1,))
    conn.execute(
        f"""
        INSERT INTO override (id, target, destination, policy, parameters, justification, ticket, duration_seconds,
            state, live, version, requested_by, requested_by_key, requested_by_name, approvals_required, created_at,
            updated_at, review_deadline, extension_round, attempts, clean_checks)
        SELECT g, 'default', 'pool' || g || '.example', 'encrypt', '', 'Pending request for the approve benchmark.',
               'POOL-' || g, 604800, 'pending', true, 1, 'alice', 'alice', 'Alice', 1, now(), now(),
               now() + interval '2 days', 0, 0, 0
        FROM generate_series({first}, {first + count - 1}) AS g
        """
    )
    return first


AUDIT_ACTIONS = (
    ("override.created", 0.40),
    ("override.approved", 0.25),
    ("override.applied", 0.20),
    ("override.expired", 0.12),
    ("override.revoked", 0.03),
)


def seed_audit(conn: psycopg.Connection[Any], count: int, overrides: int) -> str:
    """`count` audit rows forming a valid hash chain (the same canonical form as app.audit.service),
    COPYed in; the head row is set to the last one. Returns the last hash."""
    sys.path.insert(0, str(REPO_ROOT))
    from app.audit.chain import as_dict
    from app.audit.models import AuditEvent
    from app.audit.service import chain_hash  # the exact form that is hashed

    def stored_json(value: Any) -> str:  # as the service writes audit JSON (sorted and compact since issue 10)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    thresholds, acc = [], 0.0
    for action, share in AUDIT_ACTIONS:
        acc += share
        thresholds.append((acc, action))
    start = datetime(2024, 1, 1, tzinfo=UTC)
    prev = GENESIS_HASH
    columns = "seq, at, actor, via, action, override_id, before, after, comment, prev_hash, hash"
    with conn.cursor().copy(f"COPY audit_event ({columns}) FROM STDIN") as copy:
        for seq in range(1, count + 1):
            fraction = ((seq * 2654435761) % 1000) / 1000
            action = next(name for limit, name in thresholds if fraction < limit)
            override_id = 1 + (seq * 7919) % max(overrides, 1)
            event = AuditEvent(
                seq=seq,
                at=start + timedelta(seconds=seq * 13, microseconds=seq % 1000),
                actor=f"user{seq % 200}",
                via=None,
                action=action,
                override_id=override_id,
                before={"state": "pending"} if action != "override.created" else None,
                after={"state": action.split(".", 1)[1], "version": 2},
                comment="benchmark" if seq % 3 == 0 else None,
                prev_hash=prev,
                hash="",
            )
            digest = chain_hash(prev, as_dict(event))
            copy.write_row(
                (
                    seq,
                    event.at.replace(tzinfo=None),
                    event.actor,
                    None,
                    action,
                    override_id,
                    None if event.before is None else stored_json(event.before),
                    stored_json(event.after),
                    event.comment,
                    prev,
                    digest,
                )
            )
            prev = digest
    conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", (count, prev))
    conn.execute("ANALYZE audit_event")
    return prev


# ---------------------------------------------------------------------------------------------------------
# The servers under test


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start_server(name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, logs: Path) -> Server:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"{name} did not become ready:\n{log.read_text()[-3000:]}")


def start_api(database_url: str, issuer: Issuer, logs: Path, settings: dict[str, str]) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSO_", "PROMETHEUS_"))}
    env.update(
        {
            "TLSO_ENV": "production",
            "TLSO_DATABASE_URL": database_url,
            "TLSO_OIDC_ISSUER": issuer.url,
            "TLSO_OIDC_AUDIENCE": AUDIENCE,
            "TLSO_OIDC_ALGORITHMS": "RS256",
            "TLSO_DIAGNOSIS_ON_CREATE": "false",
        }
        | settings
    )
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return start_server("api", argv, env, port, "/readyz", logs)


def start_bare(logs: Path, database_url: str | None = None) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSO_", "PROMETHEUS_"))}
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
    if database_url is None:
        return start_server("bare", argv, env, port, "/", logs)
    return start_server("floor", [*argv, "--bare-database", database_url], env, port, "/", logs)


FLOOR_CONNECTIONS = 10  # as many as the API's own pool (app/core/db.py AsyncReads)


def serve_bare(port: int, database_url: str | None = None) -> None:
    """The yardstick: FastAPI, one `async def` returning a constant, served exactly as `cmd_serve` does.

    With `database_url`, also the durable-write floor: `GET /write` inserts one small row into a table of
    its own and answers its id, the way the API's create writes (psycopg, a statement prepared once per
    connection, autocommit: committed, its WAL flushed, before the answer), on a pool as large as the
    API's. No token, no validation, no audit chain: what a create could cost at the least on this machine,
    so that its ratio shows how much of the create's budget the commit alone takes."""
    import asyncio
    from collections.abc import AsyncIterator

    import uvicorn
    from fastapi import FastAPI

    sys.path.insert(0, str(REPO_ROOT))
    from app.core.config import Settings
    from app.core.logs import configure_logging

    defaults = Settings(env="test")
    configure_logging(defaults.log_level, defaults.log_json)
    idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def connected(app: FastAPI) -> AsyncIterator[None]:
        if database_url is None:
            yield
            return
        for _ in range(FLOOR_CONNECTIONS):
            idle.put_nowait(await psycopg.AsyncConnection.connect(database_url, autocommit=True))
        conn = await idle.get()
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id bigserial PRIMARY KEY, note text NOT NULL, "
            "at timestamptz NOT NULL DEFAULT now())"
        )
        idle.put_nowait(conn)
        yield
        while not idle.empty():
            await idle.get_nowait().close()

    bare = FastAPI(lifespan=connected)

    @bare.get("/")
    async def constant() -> dict[str, str]:
        return {"status": "ok"}

    @bare.get("/write")
    async def write() -> dict[str, int]:
        conn = await idle.get()
        try:
            cursor = psycopg.AsyncRawCursor(conn)
            await cursor.execute("INSERT INTO bench_floor (note) VALUES ($1) RETURNING id", ["floor"], prepare=True)
            row = await cursor.fetchone()
        finally:
            idle.put_nowait(conn)
        return {"id": row[0] if row else 0}

    # Keep in step with app/cli.py cmd_serve.
    uvicorn.run(bare, host="127.0.0.1", port=port, proxy_headers=True, log_config=None, server_header=False)


# ---------------------------------------------------------------------------------------------------------
# wrk


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(
    url: str,
    clients: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    script: str | None = None,
    work: Path | None = None,
) -> Load:
    argv = [
        "wrk",
        f"-t{min(clients, 2)}",
        f"-c{clients}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        assert work is not None
        lua = work / "request.lua"
        lua.write_text(script)
        argv += ["-s", str(lua)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        percentiles = {int(p): _ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M)}
        average = _ms(re.search(r"^\s+Latency\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"cannot read wrk's output:\n{out}") from exc
    p50, p99 = percentiles.get(50, average), percentiles.get(99, average)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        requests=total,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


LUA_THREADS = """
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
"""

LUA_CREATE = (
    LUA_THREADS
    + """
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  counter = counter + 1
  local body = string.format('{"destination":"bench-%(nonce)s-%%d-%%d.example","policy":"encrypt",'
    .. '"justification":"Recipient TLSA records are stale (benchmark run)","ticket":"BENCH-%%d","duration":"P1D"}',
    tid, counter, counter)
  return wrk.format(nil, "/v1/overrides", nil, body)
end
"""
)

LUA_APPROVE = (
    LUA_THREADS
    + """
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  local id = %(first)d + counter * %(threads)d + (tid - 1)
  counter = counter + 1
  return wrk.format(nil, "/v1/overrides/" .. id .. "/approve", nil, '{"comment":"checked the diagnosis"}')
end
"""
)


# ---------------------------------------------------------------------------------------------------------
# The measurements


@dataclass
class Tokens:
    requester: str
    reviewer: str
    auditor: str

    @classmethod
    def mint(cls, issuer: Issuer) -> Tokens:
        return cls(
            requester=issuer.mint("alice", "tlso-requesters"),
            reviewer=issuer.mint("bob", "tlso-approvers"),
            auditor=issuer.mint("audrey", "tlso-auditors"),
        )


@dataclass
class Picks:
    """Filter values that exist in the seeded data."""

    override_id: int
    ticket: str
    destination: str
    requester: str = "user7"  # about 1.3 % of the overrides: a part of a page at 1 k (≈ 13), a full one above
    target: str = "mx3"
    # Values that fill a page of 50 at every size (user0 has ≈ 7 % of the overrides, `override.approved` 25 %
    # of the audit rows), so that growth from 1 k to 1 M compares pages of the same length.
    full_requester: str = "user0"
    full_action: str = "override.approved"

    @classmethod
    def from_database(cls, url: str) -> Picks:
        with psycopg.connect(url) as conn:
            override_id, ticket, destination = conn.execute(
                "SELECT id, ticket, destination FROM override WHERE ticket IS NOT NULL AND NOT live "
                "ORDER BY id DESC OFFSET (SELECT count(*) / 2 FROM override) LIMIT 1"
            ).fetchone()  # type: ignore[misc]
        return cls(override_id, ticket, destination)


def page_paths(picks: Picks) -> dict[str, str]:
    return {
        "list (no filter)": "/v1/overrides?limit=50",
        "list state=pending": "/v1/overrides?state=pending&limit=50",
        "list ticket": f"/v1/overrides?ticket={picks.ticket}&limit=50",
        "list destination": f"/v1/overrides?destination={picks.destination}&limit=50",
        "list requester": f"/v1/overrides?requester={picks.requester}&limit=50",
        "list target": f"/v1/overrides?target={picks.target}&limit=50",
        "audit page": "/v1/audit",
        "audit action=revoked": "/v1/audit?action=override.revoked",
        "list requester, full page": f"/v1/overrides?requester={picks.full_requester}&limit=50",
        "audit action, full page": f"/v1/audit?action={picks.full_action}",
    }


REQUEST_ROWS = (
    "get",
    "list-pending",
    "create",
    "approve",
    "list-state",
    "list-ticket",
    "list-destination",
    "list-requester",
    "list-target",
    "audit",
    "healthz",
    "floor-write",
)


@dataclass
class RequestResult:
    row: str
    label: str
    clients: int
    load: Load
    bare: Load  # the bare endpoint, measured right after this cell
    ratios: list[float] = field(default_factory=list)  # every round's (`--rounds`); load/bare: the median one


@dataclass
class Report:
    requests: list[RequestResult] = field(default_factory=list)
    pages: dict[str, dict[int, Load]] = field(default_factory=dict)
    audit: dict[int, tuple[float, float, bool]] = field(default_factory=dict)  # verify rows/s, export rows/s


def measure_requests(
    args: argparse.Namespace,
    report: Report,
    api: Server,
    bare_url: str,
    url: str,
    tokens: Tokens,
    picks: Picks,
    work: Path,
) -> None:
    auth = {"Authorization": f"Bearer {tokens.reviewer}"}
    auditor = {"Authorization": f"Bearer {tokens.auditor}"}
    paths = page_paths(picks)
    simple: dict[str, tuple[str, str, dict[str, str]]] = {
        "get": ("GET /v1/overrides/{id}", f"/v1/overrides/{picks.override_id}", auth),
        "list-pending": ("GET /v1/overrides?state=pending&limit=50", paths["list state=pending"], auth),
        "list-state": ("GET /v1/overrides?state=active&limit=50", "/v1/overrides?state=active&limit=50", auth),
        "list-ticket": ("GET /v1/overrides?ticket=…", paths["list ticket"], auth),
        "list-destination": ("GET /v1/overrides?destination=…", paths["list destination"], auth),
        "list-requester": ("GET /v1/overrides?requester=…", paths["list requester"], auth),
        "list-target": ("GET /v1/overrides?target=…", paths["list target"], auth),
        "audit": ("GET /v1/audit", paths["audit page"], auditor),
        "healthz": ("GET /healthz (no auth, no database)", "/healthz", {}),
    }
    # The durable-write floor is served by a yardstick of its own, on this database.
    with floor_yardstick(work, url, "floor-write" in args.rows) as floor_url:
        nonce = 0
        for row in args.rows:
            for clients in args.clients:
                pairs: list[tuple[Load, Load]] = []
                for round_ in range(args.rounds):
                    profiler = start_profile(args, api, row, clients, work) if round_ == 0 else None
                    if row in simple:
                        label, path, headers = simple[row]
                        load = wrk(api.url + path, clients, args.duration, headers)
                    elif row == "floor-write":
                        label = "floor: bare + one durable INSERT (not tlsoverride)"
                        load = wrk(floor_url + "/write", clients, args.duration)
                    elif row == "create":
                        nonce += 1
                        label = "POST /v1/overrides (diagnosis on create off)"
                        script = LUA_CREATE % {"token": tokens.requester, "nonce": f"{os.getpid()}x{nonce}"}
                        load = wrk(api.url, clients, args.duration, script=script, work=work)
                    else:  # approve: each request decides a fresh pending override from a pool made just before
                        label = "POST /v1/overrides/{id}/approve"
                        with psycopg.connect(url, autocommit=True) as conn:
                            first = add_pending_pool(conn, int(200 * args.duration + 300))
                        threads = min(clients, 2)
                        script = LUA_APPROVE % {"token": tokens.reviewer, "first": first, "threads": threads}
                        load = wrk(api.url, clients, args.duration, script=script, work=work)
                    stop_profile(profiler)
                    time.sleep(1.0)  # let the API finish what wrk left in flight before the next cell
                    # The yardstick right after each cell: on a shared machine the load moves within minutes.
                    bare = wrk(bare_url + "/", clients, max(2.0, args.duration / 2))
                    pairs.append((load, bare))
                    print(
                        f"  {label:48} c={clients:<3} {load.rps:8.1f} rps  p50 {load.p50_ms:7.1f} ms  "
                        f"bare {bare.rps:8.1f} rps"
                        + (f"  NON-2XX {load.non_2xx}" if load.non_2xx else "")
                        + (f"  SOCKET ERRORS {load.errors}" if load.errors else ""),
                        file=sys.stderr,
                    )
                ratios = [load.rps / bare.rps for load, bare in pairs]
                load, bare = sorted(pairs, key=lambda pair: pair[0].rps / pair[1].rps)[len(pairs) // 2]
                report.requests.append(RequestResult(row, label, clients, load, bare, ratios))


@contextlib.contextmanager
def floor_yardstick(work: Path, database_url: str, wanted: bool) -> Iterator[str]:
    """The floor's URL while it is served (`serve_bare` with a database), "" when it is not wanted."""
    if not wanted:
        yield ""
        return
    floor = start_bare(work, database_url)
    try:
        yield floor.url
    finally:
        floor.stop()


def measure_pages(
    args: argparse.Namespace, report: Report, size: int, api: Server, tokens: Tokens, picks: Picks
) -> None:
    """Each page `--page-rounds` times, the rounds interleaved; the round with the lowest median counts
    (other processes on a shared machine only ever make a round slower)."""
    for _ in range(args.page_rounds):
        for name, path in page_paths(picks).items():
            token = tokens.auditor if path.startswith("/v1/audit") else tokens.reviewer
            load = wrk(api.url + path, 1, args.page_duration, {"Authorization": f"Bearer {token}"})
            best = report.pages.setdefault(name, {}).get(size)
            if best is None or load.p50_ms < best.p50_ms:
                report.pages[name][size] = load
            print(f"  {size:>9,} rows  {name:26} p50 {load.p50_ms:8.2f} ms  p99 {load.p99_ms:8.2f} ms", file=sys.stderr)


def measure_audit(report: Report, size: int, api: Server, tokens: Tokens) -> None:
    headers = {"Authorization": f"Bearer {tokens.auditor}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=1800) as http:
        started = time.perf_counter()
        answer = http.get("/v1/audit/verify")
        verify_seconds = time.perf_counter() - started
        answer.raise_for_status()
        result = answer.json()
        started, rows = time.perf_counter(), 0
        with http.stream("GET", "/v1/audit/export") as stream:
            stream.raise_for_status()
            for line in stream.iter_lines():
                rows += bool(line)
        export_seconds = time.perf_counter() - started
    if rows != size or result["checked"] != size:
        raise SystemExit(f"audit at {size}: exported {rows}, verified {result['checked']}")
    report.audit[size] = (size / verify_seconds, size / export_seconds, bool(result["valid"]))
    print(
        f"  {size:>9,} rows  verify {size / verify_seconds:10,.0f} rows/s (valid={result['valid']})  "
        f"export {size / export_seconds:10,.0f} rows/s",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------------
# Profiling one row with py-spy


def start_profile(args: argparse.Namespace, api: Server, row: str, clients: int, work: Path) -> Any:
    if args.profile != row or clients != max(args.clients):
        return None
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    out = work / f"profile-{row}.txt"
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(api.process.pid),
            "--format",
            "raw",
            "--output",
            str(out),
            "--duration",
            str(max(1, round(args.duration))),
            "--rate",
            "200",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return (process, out, args.profile_out)


def stop_profile(profiler: Any) -> None:
    if profiler is None:
        return
    process, out, keep = profiler
    process.wait(120)
    if keep:
        shutil.copy(out, keep)
    summarise_profile(out)


def summarise_profile(path: Path, top: int = 25) -> None:
    """Where the samples are: each function's share of samples it is on the stack of (inclusive)."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = {re.sub(r" \(.*/site-packages/", " (", frame) for frame in stack.split(";")}
        for frame in frames:
            inclusive[frame] += count
    print(f"\nprofile ({total} samples), inclusive share:", file=sys.stderr)
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {frame}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Output


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = next(
        (line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0"
    )
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {int(memory) / 1024 / 1024:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )


def print_report(args: argparse.Namespace, report: Report) -> None:
    print(f"\nMachine: {machine()}")
    print(
        f"wrk, {args.duration:g} s per cell, the bare endpoint measured right after each cell for "
        f"{max(2.0, args.duration / 2):g} s"
        + (f", each cell {args.rounds} times (the round of the median ratio shown)" if args.rounds > 1 else "")
        + f"; pages: best p50 of {args.page_rounds} rounds of {args.page_duration:g} s\n"
    )
    if report.requests:
        spread = args.rounds > 1
        header = "| request | clients | tlsoverride rps | bare rps | ratio | p50 ms | non-2xx |"
        print(header + (" ratios |" if spread else ""))
        print("|---|---|---|---|---|---|---|" + ("---|" if spread else ""))
        for result in report.requests:
            bare = result.bare
            print(
                f"| `{result.label}` | {result.clients} | {result.load.rps:,.0f} | {bare.rps:,.0f} | "
                f"{result.load.rps / bare.rps:.3f} | {result.load.p50_ms:.1f} | {result.load.non_2xx} |"
                + (f" {' / '.join(f'{ratio:.3f}' for ratio in result.ratios)} |" if spread else "")
            )
        print()
    if report.pages:
        sizes = sorted({size for by_size in report.pages.values() for size in by_size})
        print(
            "| page (1 client, p50 ms) | " + " | ".join(f"{size:,} rows" for size in sizes) + " | largest / smallest |"
        )
        print("|---|" + "---|" * (len(sizes) + 1))
        for name, by_size in report.pages.items():
            cells = [f"{by_size[size].p50_ms:.2f}" if size in by_size else "—" for size in sizes]
            ratio = by_size[sizes[-1]].p50_ms / by_size[sizes[0]].p50_ms if len(by_size) == len(sizes) else 0
            print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
        print()
    if report.audit:
        print("| audit rows | verify rows/s | export rows/s | chain valid |")
        print("|---|---|---|---|")
        for size, (verify, export, valid) in sorted(report.audit.items()):
            print(f"| {size:,} | {verify:,.0f} | {export:,.0f} | {valid} |")


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per cell, sizes 1 k and 100 k")
    parser.add_argument("--only", default="requests,pages,audit", help="any of: requests, pages, audit")
    parser.add_argument("--rows", default=",".join(REQUEST_ROWS), help=f"request rows: {', '.join(REQUEST_ROWS)}")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--sizes", help="row counts for pages/audit (default 1000,100000,1000000)")
    parser.add_argument("--duration", type=float, help="seconds per request cell (default 10, quick 3)")
    parser.add_argument("--page-duration", type=float, help="seconds per page cell (default 5, quick 2)")
    parser.add_argument("--page-rounds", type=int, default=2, help="measure each page this often, keep the best")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each request cell (and the bare endpoint after it) this often; the median ratio counts",
    )
    parser.add_argument("--profile", metavar="ROW", help="record this request row (at the most clients) with py-spy")
    parser.add_argument("--profile-out", type=Path, help="keep the raw py-spy stacks here")
    parser.add_argument(
        "--keep",
        default="",
        help="sizes whose database is kept after the run and reused (upgraded, not reseeded) by the next run "
        "(the request table's 1 k database changes as it runs: do not keep that one)",
    )
    parser.add_argument(
        "--api-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the API process, e.g. TLSO_BRIEF_CACHE_SIZE=0 (list pages encoded anew every time)",
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-database", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.bare_database)
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    only = set(args.only.split(","))
    args.rows = [row for row in args.rows.split(",") if row]
    unknown = set(args.rows) - set(REQUEST_ROWS)
    if unknown:
        raise SystemExit(f"unknown rows: {sorted(unknown)}")
    args.clients = [int(n) for n in args.clients.split(",")]
    args.keep = {int(n) for n in args.keep.split(",") if n}
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.page_duration = args.page_duration or (2.0 if args.quick else 5.0)
    sizes = [int(n) for n in (args.sizes or ("1000,100000" if args.quick else "1000,100000,1000000")).split(",")]
    if not only & {"pages", "audit"}:
        sizes = [1000]
    if "requests" in only and 1000 not in sizes:
        sizes = [1000, *sizes]  # the request table runs on the 1 k database

    report = Report()
    issuer = Issuer()
    tokens = Tokens.mint(issuer)
    with tempfile.TemporaryDirectory(prefix="tlso-bench-api-") as tmp, postgres_server():
        work = Path(tmp)
        try:
            bare = start_bare(work) if "requests" in only else None
            for size in sizes:
                print(f"seeding {size:,} overrides and audit rows", file=sys.stderr)
                name = f"{DB_PREFIX}_{size}"
                keep = size in args.keep
                reuse = keep and seeded_rows(name) == size
                with bench_database(name, keep) as url:
                    started = time.perf_counter()
                    if reuse:
                        print(f"  reusing the kept database {name}", file=sys.stderr)
                    else:
                        with psycopg.connect(url, autocommit=True) as conn:
                            seed_overrides(conn, size)
                            seed_audit(conn, size, size)
                        print(f"  seeded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
                    picks = Picks.from_database(url)
                    api = start_api(url, issuer, work, dict(setting.split("=", 1) for setting in args.api_setting))
                    try:
                        if "pages" in only:
                            measure_pages(args, report, size, api, tokens, picks)
                        if "audit" in only:
                            measure_audit(report, size, api, tokens)
                        if bare is not None and size == 1000:
                            measure_requests(args, report, api, bare.url, url, tokens, picks, work)
                    finally:
                        api.stop()
        finally:
            if bare is not None:
                bare.stop()
            issuer.stop()
    print_report(args, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
