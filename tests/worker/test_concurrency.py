"""Two worker processes on one PostgreSQL database: every override applied once and removed once.

Verified from the stand-in's call log (what mailcow was actually asked to do), not from the database.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from app.overrides.models import OverrideState
from devtools.mailcow_standin import MailcowStandin
from tests.helpers import load
from tests.standin import ServedStandin, calls, mailcow_rows
from tests.worker.helpers import (
    WorkerProcess,
    assert_chain_valid,
    audit_after,
    expire_now,
    seed_approved,
    states,
    wait_for,
    worker_env,
)

S = OverrideState
COUNT = 100


@pytest.mark.parametrize("backend", ["postgres"])
def test_two_workers_apply_and_remove_each_override_exactly_once(
    engine: Engine,
    database_url: str,
    standin: MailcowStandin,
    served_standin: ServedStandin,
    worker_processes: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    ids = seed_approved(engine, COUNT)
    for name in ("w1", "w2"):
        env = worker_env(
            database_url,
            served_standin.url,
            TLSO_WORKER_ID=name,
            TLSO_WORKER_BATCH_SIZE="5",  # small batches: the two workers interleave many claims
            TLSO_WORKER_LEASE_SECONDS="30",
        )
        worker_processes.append(WorkerProcess(env, tmp_path, name))

    wait_for(lambda: set(states(engine, ids).values()) == {S.active}, 60, "all applied", *worker_processes)
    added = Counter(json.loads(call["body"])["dest"] for call in calls(standin, "add"))
    assert len(added) == COUNT and set(added.values()) == {1}  # each row added once, never retried by a rival
    rows = mailcow_rows(standin)
    assert len(rows) == COUNT
    for override_id in ids:
        override = load(engine, override_id)
        assert rows[override.destination]["id"] == override.mailcow_id and override.conflict is None
    applied_by = Counter(after["worker"] for i in ids for after in audit_after(engine, i, "override.applied"))
    assert sum(applied_by.values()) == COUNT and set(applied_by) == {"w1", "w2"}  # both worked, none twice

    expire_now(engine, *ids)
    wait_for(lambda: set(states(engine, ids).values()) == {S.expired}, 60, "all removed", *worker_processes)
    deleted = Counter(row_id for call in calls(standin, "delete") for row_id in json.loads(call["body"]))
    assert len(deleted) == COUNT and set(deleted.values()) == {1}  # each row deleted once
    assert standin.rows() == []
    removed_by = Counter(after["worker"] for i in ids for after in audit_after(engine, i, "override.removed"))
    assert sum(removed_by.values()) == COUNT
    assert_chain_valid(engine)
