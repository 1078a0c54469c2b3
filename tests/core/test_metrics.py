"""Metrics shared through PROMETHEUS_MULTIPROC_DIR by processes in containers: every container's process
is pid 1, and two of them writing at once must still add up (deploy/compose.yaml runs 2 API replicas
and 2 workers on one metrics volume)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

ROOT = Path(__file__).resolve().parents[2]

# Count one applied override, after both "containers" have opened their metric files.
CONTAINER = """
import os, pathlib, sys, time
import app.core.metrics as metrics
assert os.getpid() == 1, os.getpid()
child = metrics.WORKER_JOBS.labels("apply", "applied")
pathlib.Path(sys.argv[1], "ready-" + sys.argv[2]).touch()
while not pathlib.Path(sys.argv[1], "go").exists():
    time.sleep(0.01)
child.inc()
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--uts", "--pid", "--fork", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare with PID and UTS namespaces (root)")
def test_two_containers_with_pid_1_add_up_in_one_metrics_directory(tmp_path: Path) -> None:
    metrics_dir, sync = tmp_path / "metrics", tmp_path / "sync"
    metrics_dir.mkdir()
    sync.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    containers = [
        subprocess.Popen(
            [
                "unshare", "--uts", "--pid", "--fork", "sh", "-c",
                f'hostname "$1" && exec "{sys.executable}" -c "$2" "$3" "$1"',
                "sh", f"api-{n}", CONTAINER, str(sync),
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]  # fmt: skip
    deadline = time.monotonic() + 30
    while len(list(sync.glob("ready-*"))) < 2:
        for container in containers:
            assert container.poll() is None, container.communicate()[1]
        assert time.monotonic() < deadline, "the containers did not start"
        time.sleep(0.02)
    (sync / "go").touch()
    for container in containers:
        assert container.wait(30) == 0, container.communicate()[1]

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(metrics_dir))  # type: ignore[no-untyped-call]
    applied = registry.get_sample_value("tlso_worker_jobs_total", {"job": "apply", "outcome": "applied"})
    assert applied == 2
