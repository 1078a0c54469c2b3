"""Benchmark: approval → the destination's deferred mail released, against approval → active.

One worker (`python -m app worker`, SQLite, dev-mode timing: poll 0.5 s) and the mailcow stand-in
(`python -m devtools.mailcow_standin`) over real HTTP, both real processes. Each destination has
deferred mail in the stand-in's queue (`--messages` messages each, a DANE failure as the reason); the
overrides are approved one by one at random moments. Times come from the database against the moment
of approval: `applied_at` (active) and `queue_release.released_at` (written once mailcow has taken the
`deliver` calls for every deferred message of the destination). At the end the stand-in's queue must
hold none of those messages, and no `flush`, `super_delete` or `delete/mailq` may have reached it.

    .venv/bin/python bench/bench_release.py [--samples 40] [--messages 25]
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_worker import (  # noqa: E402
    PG_URL,
    Workers,
    approve,
    as_utc,
    database,
    insert,
    new_override,
    percentile,
    standin_process,
)

from app.core.db import make_engine  # noqa: E402
from app.overrides.models import OverrideState  # noqa: E402

S = OverrideState
REASON = "TLSA lookup error for mx.example.org:25"


def wait_released(engine: sa.Engine, ids: list[int], timeout: float) -> dict[int, tuple[datetime, datetime]]:
    """(applied_at, released_at) of every override, once all are released."""
    deadline = time.monotonic() + timeout
    query = sa.text("SELECT id, applied_at, queue_release FROM override WHERE id BETWEEN :low AND :high")
    while True:
        with engine.connect() as conn:
            rows = conn.execute(query, {"low": min(ids), "high": max(ids)}).all()
        done = {}
        for override_id, applied_at, queue_release in rows:
            value = json.loads(queue_release) if isinstance(queue_release, str) else queue_release
            if applied_at is not None and isinstance(value, dict) and value.get("released_at"):
                applied = applied_at if isinstance(applied_at, datetime) else datetime.fromisoformat(applied_at)
                done[override_id] = (as_utc(applied), datetime.fromisoformat(value["released_at"]))
        if len(done) == len(ids):
            return done
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {len(done)} of {len(ids)} released")
        time.sleep(0.05)


def run(mailcow_url: str, key: str, samples: int, messages: int, log_dir: Path) -> tuple[list[float], list[float]]:
    httpx.delete(f"{mailcow_url}/__standin__/queue", timeout=10).raise_for_status()
    overrides = [new_override(n, "rel", S.pending, 3600) for n in range(samples)]
    for override in overrides:
        fill = {"domain": override.destination, "messages": messages, "reason": REASON}
        httpx.post(f"{mailcow_url}/__standin__/queue", json=fill, timeout=10).raise_for_status()
    httpx.post(  # mail for a destination nobody overrides: it must stay where it is
        f"{mailcow_url}/__standin__/queue", json={"domain": "bystander.example", "messages": 5}, timeout=10
    ).raise_for_status()
    with database("sqlite", PG_URL) as url:
        engine = make_engine(url)
        ids = insert(engine, overrides)
        workers = Workers(url, mailcow_url, key, 1, log_dir, TLSO_QUEUE_CHECK_SECONDS="3600")
        try:
            workers.wait_ready(engine)
            approved_at = {}
            for override_id in ids:
                time.sleep(random.uniform(0.05, 0.35))
                approved_at[override_id] = approve(engine, override_id)
            done = wait_released(engine, ids, 120)
        finally:
            workers.stop()
        engine.dispose()
    queue = httpx.get(f"{mailcow_url}/__standin__/queue", timeout=10).json()
    left = [m for m in queue["messages"] if any(".example" in r and "rel" in r for r in m["recipients"])]
    bystanders = [m for m in queue["messages"] if any("bystander.example" in r for r in m["recipients"])]
    if left or len(bystanders) != 5 or queue["forbidden"]:
        wrong = f"{len(left)} left, {len(bystanders)} bystanders, forbidden calls {queue['forbidden']}"
        raise SystemExit(f"wrong queue afterwards: {wrong}")
    to_active = [(done[i][0] - approved_at[i]).total_seconds() for i in ids]
    to_released = [(done[i][1] - approved_at[i]).total_seconds() for i in ids]
    return to_active, to_released


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="overrides approved one by one")
    parser.add_argument("--messages", type=int, default=25, help="deferred messages per destination")
    args = parser.parse_args()
    key = "-".join(secrets.token_hex(3).upper() for _ in range(5))
    log_dir = Path(tempfile.mkdtemp(prefix="tlso-bench-logs-"))
    with standin_process(key) as mailcow_url:
        print(f"{args.samples} approvals one by one, {args.messages} deferred messages each ...", file=sys.stderr)
        to_active, to_released = run(mailcow_url, key, args.samples, args.messages, log_dir)
    gaps = [released - active for active, released in zip(to_active, to_released, strict=True)]
    print(
        f"\nrelease over {len(to_active)} overrides, {args.messages} deferred messages each "
        "(1 worker, SQLite, TLSO_WORKER_POLL_SECONDS=0.5, TLSO_QUEUE_RELEASE_BATCH=100, stand-in over HTTP)"
    )
    print(f"{'':28}{'median':>10}{'p95':>10}{'max':>10}")
    rows = (("approval -> active", to_active), ("approval -> mail released", to_released), ("active -> released", gaps))
    for label, values in rows:
        print(f"{label:28}{statistics.median(values):>9.3f}s{percentile(values, 0.95):>9.3f}s{max(values):>9.3f}s")
    print(f"\n(worker logs: {log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
