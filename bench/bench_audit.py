"""Benchmark: what signed checkpoints cost — the worker's checkpoint transaction (it holds the chain's
lock, so API writes wait behind it), a plain one-row append for comparison, the idle check the worker
makes every pass, and offline verification of an export with checkpoints every 100 rows.

SQLite in a temporary file, and PostgreSQL when reachable.

    .venv/bin/python bench/bench_audit.py [--events 20000] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from app.audit.chain import as_dict  # noqa: E402
from app.audit.checkpoints import write_checkpoint  # noqa: E402
from app.audit.export import parse_export, to_jsonl  # noqa: E402
from app.audit.service import iter_events, record, verify_events  # noqa: E402
from app.audit.signing import Signer  # noqa: E402
from app.core.config import CoreSettings  # noqa: E402
from app.core.db import make_engine, reading, transaction  # noqa: E402
from app.core.migrations import upgrade  # noqa: E402

PG_URL = os.environ.get("TLSO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def timed(fn: Callable[[], object], runs: int, before: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """Median and max in milliseconds (`before` runs untimed before each run)."""
    samples = []
    for _ in range(runs):
        before()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def bench(url: str, events: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    signer = Signer(Ed25519PrivateKey.generate())
    settings = CoreSettings()

    def append() -> None:
        with transaction(engine) as session:
            record(session, actor="alice", action="override.commented", comment="x" * 80)

    start = time.perf_counter()
    for n in range(events):
        append()
        if n % 100 == 99:
            write_checkpoint(engine, signer)
    fill = time.perf_counter() - start
    append_ms = timed(append, 200)
    checkpoint_ms = timed(lambda: write_checkpoint(engine, signer), 200, before=append)
    idle_ms = timed(lambda: write_checkpoint(engine, signer, settings), 200)  # nothing due: no lock taken

    with reading(engine) as session:
        export = [to_jsonl(as_dict(e)) for e in iter_events(session)]
    start = time.perf_counter()
    result = verify_events(parse_export(export, "jsonl"), {signer.public.key_id: signer.public})
    verify_s = time.perf_counter() - start
    assert result.valid and result.checkpoints >= events // 100, result
    print(f"{engine.dialect.name}: {len(export)} rows written in {fill:.1f}s")
    print(f"  one-row append transaction     median {append_ms[0]:.2f} ms  max {append_ms[1]:.2f} ms")
    print(f"  checkpoint transaction         median {checkpoint_ms[0]:.2f} ms  max {checkpoint_ms[1]:.2f} ms")
    print(f"  worker's idle check (not due)  median {idle_ms[0]:.2f} ms  max {idle_ms[1]:.2f} ms")
    print(
        f"  offline verify of the export   {verify_s:.2f} s = {len(export) / verify_s:,.0f} rows/s "
        f"({result.checkpoints} signatures)"
    )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--pg-url", default=PG_URL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        bench(f"sqlite:///{folder}/bench.db", args.events)
    admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    name = f"tlso_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL skipped: {exc.orig}")
        return
    try:
        bench(str(sa.make_url(args.pg_url).set(database=name)), args.events)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
