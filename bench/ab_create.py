"""Interleaved A/B of `POST /v1/overrides` (diagnosis on create off): this tree's API and another tree's
(e.g. a `git archive main` copy with its own .venv), each on its own database on the same PostgreSQL, one
create at a time, alternating between them, so that both see the same load on a shared machine. Prints the
latency percentiles and the API process's CPU time per create for each.

    TLSO_BENCH_DB_PREFIX=tlso_<name> .venv/bin/python bench/ab_create.py /tmp/<name>-base [--creates 400]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_api as b


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(tag: str, i: int) -> dict[str, Any]:
    return {
        "destination": f"ab-{tag}-{os.getpid()}-{i}.example",
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale (benchmark run)",
        "ticket": "BENCH-1",
        "duration": "P1D",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other tree (with its own .venv)")
    parser.add_argument("--creates", type=int, default=400, help="measured creates per side")
    args = parser.parse_args()
    trees = {"this": b.REPO_ROOT, "other": args.other.resolve()}
    issuer = b.Issuer()
    token = issuer.mint("alice", "tlso-requesters")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        apis: dict[str, b.Server] = {}
        for tag, root in trees.items():
            url = stack.enter_context(b.bench_database(f"{b.DB_PREFIX}_ab_{tag}"))
            sys.executable, b.REPO_ROOT = str(root / ".venv/bin/python"), root  # start_api runs this tree's
            (Path(tmp) / tag).mkdir()
            apis[tag] = b.start_api(url, issuer, Path(tmp) / tag)
            stack.callback(apis[tag].stop)
        headers = {"Authorization": f"Bearer {token}"}
        clients = {
            tag: stack.enter_context(httpx.Client(base_url=api.url, headers=headers)) for tag, api in apis.items()
        }
        for i in range(30):  # warm up: connections, compiled statements
            for tag, client in clients.items():
                assert client.post("/v1/overrides", json=body(tag, i)).status_code == 201
        latencies: dict[str, list[float]] = {tag: [] for tag in apis}
        started = {tag: cpu_seconds(api.process.pid) for tag, api in apis.items()}
        for i in range(30, 30 + args.creates):
            for tag, client in clients.items():
                begin = time.perf_counter()
                response = client.post("/v1/overrides", json=body(tag, i))
                latencies[tag].append(time.perf_counter() - begin)
                assert response.status_code == 201, response.text
        for tag, api in apis.items():
            deciles = [1000 * d for d in statistics.quantiles(latencies[tag], n=10)]
            median = 1000 * statistics.median(latencies[tag])
            cpu = 1000 * (cpu_seconds(api.process.pid) - started[tag]) / args.creates
            print(
                f"{tag:5} ({trees[tag]}): p10 {deciles[0]:.2f} ms  p50 {median:.2f} ms  p90 {deciles[-1]:.2f} ms"
                f"  API CPU per create {cpu:.2f} ms"
            )
    issuer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
