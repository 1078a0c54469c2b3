"""Benchmark: the worker against the mailcow stand-in — latency and throughput.

* approval → active and expiry → removed (median, p95), one worker on SQLite with dev-mode timing
  (poll 0.5 s): approvals arrive one by one at random moments, each override lasts a few seconds;
* apply (and removal) throughput for N overrides approved at once: one worker on SQLite, one and two
  workers on PostgreSQL.

Everything runs in real processes: the stand-in (`python -m devtools.mailcow_standin`) and the workers
(`python -m app worker`). Times come from the database (`applied_at`, `expires_at`, `ended_at`, set by
the worker) against the moment of approval.

    .venv/bin/python bench/bench_worker.py [--overrides 1000] [--samples 60] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from app.audit.service import record  # noqa: E402
from app.core.db import make_engine, transaction, utcnow  # noqa: E402
from app.core.migrations import upgrade  # noqa: E402
from app.overrides import lifecycle  # noqa: E402
from app.overrides.models import Override, OverrideState  # noqa: E402

S = OverrideState
PG_URL = os.environ.get("TLSO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def standin_process(key: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.mailcow_standin",
            "--port",
            str(port),
            "--api-key",
            key,
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/__standin__/faults", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the stand-in did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def database(backend: str, pg_url: str) -> Iterator[str]:
    if backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="tlso-bench-")
        url = f"sqlite:///{directory}/bench.db"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        try:
            yield url
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    name = f"tlso_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = str(sa.make_url(pg_url).set(database=name))
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Workers:
    def __init__(self, database_url: str, mailcow_url: str, key: str, count: int, log_dir: Path, **env: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TLSO_")}
        base.update(
            {
                "TLSO_ENV": "test",
                "TLSO_DATABASE_URL": database_url,
                "TLSO_MAILCOW_URL": mailcow_url,
                "TLSO_MAILCOW_API_KEY": key,
                "TLSO_LOG_JSON": "false",
                "TLSO_LOG_LEVEL": "WARNING",
                "TLSO_WORKER_POLL_SECONDS": "0.5",  # dev mode's interval
                "TLSO_RECONCILE_INTERVAL_SECONDS": "3600",
                "TLSO_REMEDIATION": "off",  # the remediation watch would diagnose the made-up domains
                **env,
            }
        )
        self.processes = []
        for n in range(count):
            log = (log_dir / f"worker{n}.log").open("ab")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app", "worker"],
                    cwd=REPO_ROOT,
                    env={**base, "TLSO_WORKER_ID": f"bench{n}"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_ready(self, engine: sa.Engine) -> None:
        """Each worker creates the target row on its first loop; wait for it (and for imports to finish)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                found = conn.execute(sa.text("SELECT count(*) FROM mailcow_target")).scalar_one()
            if found:
                time.sleep(1.0)  # the second worker's imports
                return
            time.sleep(0.1)
        raise SystemExit("the workers did not start")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(20)


def new_override(n: int, prefix: str, state: OverrideState, seconds: int) -> Override:
    now = utcnow()
    return Override(
        target="default",
        destination=f"{prefix}{n}.example",
        policy="encrypt",
        parameters="",
        justification="benchmark",
        duration_seconds=seconds,
        state=state,
        requested_by="bench",
        requested_by_key="bench",
        requested_by_name="Bench",
        created_at=now,
        updated_at=now,
        next_attempt_at=now if state == S.approved else None,
        approvals_required=1,
    )


def insert(engine: sa.Engine, overrides: list[Override]) -> list[int]:
    with transaction(engine) as session:
        for override in overrides:
            session.add(override)
        session.flush()
        for override in overrides:
            record(session, actor="bench", action="override.created", override_id=override.id, after={})
        return [override.id or 0 for override in overrides]


def approve(engine: sa.Engine, override_id: int) -> datetime:
    """The final step of `decisions.approve`: pending → approved, due for the worker now."""
    with transaction(engine) as session:
        override = lifecycle.load(session, override_id, for_update=True)
        now = utcnow()
        lifecycle.transition(
            session,
            override,
            S.approved,
            actor="bench",
            action="override.approved",
            comment="bench",
            changes={"next_attempt_at": now},
        )
        return now


def rows(engine: sa.Engine, ids: list[int]) -> list[Any]:
    with engine.connect() as conn:
        result = conn.execute(
            sa.select(Override.id, Override.state, Override.applied_at, Override.expires_at, Override.ended_at)  # type: ignore[call-overload]
        ).all()
    wanted = set(ids)
    return [row for row in result if row.id in wanted]


def wait_all(engine: sa.Engine, ids: list[int], state: OverrideState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = sa.text("SELECT count(*) FROM override WHERE state != :state AND id BETWEEN :low AND :high")
    while time.monotonic() < deadline:
        with engine.connect() as conn:  # cheap: the poll must not slow the workers down
            if conn.execute(query, {"state": state.value, "low": min(ids), "high": max(ids)}).scalar_one() == 0:
                return
        time.sleep(0.1)
    counts: dict[str, int] = {}
    for row in rows(engine, ids):
        counts[str(row.state)] = counts.get(str(row.state), 0) + 1
    raise SystemExit(f"timed out waiting for {state}: {counts}")


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def latency(mailcow_url: str, key: str, samples: int, log_dir: Path) -> tuple[list[float], list[float]]:
    with database("sqlite", PG_URL) as url:
        engine = make_engine(url)
        ids = insert(engine, [new_override(n, "lat", S.pending, 3) for n in range(samples)])
        workers = Workers(url, mailcow_url, key, 1, log_dir)
        try:
            workers.wait_ready(engine)
            approved_at = {}
            for override_id in ids:
                time.sleep(random.uniform(0.05, 0.35))
                approved_at[override_id] = approve(engine, override_id)
            wait_all(engine, ids, S.expired, 120)
        finally:
            workers.stop()
        to_active, to_removed = [], []
        for row in rows(engine, ids):
            to_active.append((as_utc(row.applied_at) - approved_at[row.id]).total_seconds())
            to_removed.append((as_utc(row.ended_at) - as_utc(row.expires_at)).total_seconds())
        engine.dispose()
        return to_active, to_removed


def throughput(
    mailcow_url: str, key: str, backend: str, workers_count: int, count: int, pg_url: str, log_dir: Path
) -> tuple[float, float]:
    httpx.post(f"{mailcow_url}/__standin__/reset", timeout=10).raise_for_status()
    with database(backend, pg_url) as url:
        engine = make_engine(url)
        workers = Workers(url, mailcow_url, key, workers_count, log_dir)
        try:
            workers.wait_ready(engine)
            started = time.monotonic()
            ids = insert(engine, [new_override(n, "tp", S.approved, 3600) for n in range(count)])
            wait_all(engine, ids, S.active, 600)
            applied = time.monotonic() - started
            with transaction(engine) as session:
                session.execute(
                    sa.update(Override)
                    .where(Override.state == S.active)  # type: ignore[arg-type]
                    .values(expires_at=utcnow() - timedelta(seconds=1))
                )
            started = time.monotonic()
            wait_all(engine, ids, S.expired, 600)
            removed = time.monotonic() - started
        finally:
            workers.stop()
        leftover = httpx.get(f"{mailcow_url}/__standin__/rows", timeout=10).json()
        if leftover:
            raise SystemExit(f"{len(leftover)} rows left in mailcow after the removal")
        engine.dispose()
        return applied, removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", type=int, default=1000, help="overrides for the throughput runs")
    parser.add_argument("--samples", type=int, default=60, help="overrides for the latency run")
    parser.add_argument("--pg-url", default=PG_URL, help="PostgreSQL admin URL (a scratch database is created)")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    key = "-".join(secrets.token_hex(3).upper() for _ in range(5))
    log_dir = Path(tempfile.mkdtemp(prefix="tlso-bench-logs-"))
    with standin_process(key) as mailcow_url:
        print(f"latency: {args.samples} approvals one by one, 1 worker, SQLite, poll 0.5 s ...", file=sys.stderr)
        to_active, to_removed = latency(mailcow_url, key, args.samples, log_dir)
        runs = [("sqlite", 1)] + ([] if args.skip_postgres else [("postgres", 1), ("postgres", 2)])
        results = []
        for backend, count in runs:
            print(f"throughput: {args.overrides} overrides, {count} worker(s), {backend} ...", file=sys.stderr)
            results.append(
                (backend, count, *throughput(mailcow_url, key, backend, count, args.overrides, args.pg_url, log_dir))
            )

    print(f"\nlatency over {len(to_active)} overrides (1 worker, SQLite, TLSO_WORKER_POLL_SECONDS=0.5)")
    print(f"{'':24}{'median':>10}{'p95':>10}{'max':>10}")
    for label, values in (("approval -> active", to_active), ("expiry -> removed", to_removed)):
        print(f"{label:24}{statistics.median(values):>9.3f}s{percentile(values, 0.95):>9.3f}s{max(values):>9.3f}s")
    print(f"\nthroughput for {args.overrides} overrides approved (then expired) at once")
    print(f"{'database':12}{'workers':>8}{'apply':>10}{'per s':>9}{'remove':>10}{'per s':>9}")
    for backend, count, applied, removed in results:
        print(
            f"{backend:12}{count:>8}{applied:>9.2f}s{args.overrides / applied:>9.0f}"
            f"{removed:>9.2f}s{args.overrides / removed:>9.0f}"
        )
    print(f"\n(worker logs: {log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
