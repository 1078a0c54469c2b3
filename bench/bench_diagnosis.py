"""Benchmark: how long diagnose() takes for a domain with 1, 2 and 4 MX hosts.

Each bench host (slowN.example.test in the lab) greets only after a delay (default 200 ms), like a
busy or distant MTA. With hosts probed in parallel a domain costs about one delay whatever its MX
count; the `concurrency=1` rows show the sequential cost for comparison. Each address with usable
TLSA records is probed twice (with SNI, as Postfix at the dane level, and without, as Postfix under
an override), so a sequential run pays two delays per host. The last rows time a domain whose only
host speaks TLS 1.1: its failed handshakes are followed by a third probe that allows TLS 1.0/1.1.

    .venv/bin/python bench/bench_diagnosis.py [--runs 20] [--banner-delay 0.2] [--lab-dir DIR]

Without --lab-dir a lab is built in a temporary directory, started, and stopped at the end
(needs nsd, unbound and ldnsutils; see tests/lab/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LEGACY_DOMAIN = "legacy.example.test"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


async def measure(domain: str, config: Any, runs: int, verdict: str = "ok") -> list[float]:
    from app.diagnosis import diagnose

    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        diagnosis = await diagnose(domain, config)
        durations.append((time.perf_counter() - started) * 1000)
        if diagnosis.verdict != verdict:
            raise SystemExit(f"{domain}: unexpected verdict {diagnosis.verdict}: {diagnosis.explanation}")
    return durations


async def bench(lab: Any, runs: int) -> list[tuple[str, int, int, float, float]]:
    from tests.lab.topology import BENCH_DOMAINS

    rows = []
    await measure(BENCH_DOMAINS[0], lab.config(), 2)  # warm the resolver cache and imports
    for concurrency in (8, 1):
        for count, domain in zip((1, 2, 4), BENCH_DOMAINS, strict=True):
            durations = await measure(domain, lab.config(concurrency=concurrency), runs)
            rows.append((domain, count, concurrency, statistics.median(durations), percentile(durations, 0.95)))
    # The one case that costs an extra probe: a host whose handshake fails under mailcow's settings is
    # probed once more, allowing TLS 1.0/1.1 (legacy.example.test: TLS 1.1 only, no greeting delay).
    for concurrency in (8, 1):
        durations = await measure(LEGACY_DOMAIN, lab.config(concurrency=concurrency), runs, verdict="blocked")
        rows.append((LEGACY_DOMAIN, 1, concurrency, statistics.median(durations), percentile(durations, 0.95)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--banner-delay", type=float, default=0.2, help="seconds each bench host waits to greet")
    parser.add_argument("--lab-dir", type=Path, help="use a lab that is already running there")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from tests.lab.lab import Lab

    with tempfile.TemporaryDirectory(prefix="tlso-bench-") as tmp:
        if args.lab_dir:
            lab, owned = Lab.load(args.lab_dir), False
        else:
            lab, owned = Lab.build(Path(tmp), banner_delay=args.banner_delay), True
            lab.start()
        try:
            rows = asyncio.run(bench(lab, args.runs))
        finally:
            if owned:
                lab.stop()
    print(f"diagnose() over {args.runs} runs each; every MX host greets after {lab.banner_delay * 1000:.0f} ms")
    print(f"{'domain':24} {'MX hosts':>8} {'concurrency':>11} {'median ms':>10} {'p95 ms':>8}")
    for domain, count, concurrency, median, p95 in rows:
        print(f"{domain:24} {count:>8} {concurrency:>11} {median:>10.1f} {p95:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
