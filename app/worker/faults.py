"""Fault injection for the crash tests: `TLSO_WORKER_CRASH_AT=<point>[:<nth>]` kills the worker there.

The process SIGKILLs itself (no cleanup, no commit, no lease release), exactly like `kill -9` or an
OOM kill, the n-th time (default: the first) it reaches the named point.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

CRASH_ENV = "TLSO_WORKER_CRASH_AT"

POINTS = frozenset(
    {
        "after_claim",  # apply claimed (lease), nothing sent yet
        "after_add",  # mailcow added our row; nothing recorded
        "before_record_apply",  # row added and found; the `active` transition not committed
        "after_replace_delete",  # the foreign row of a conflict deleted; not recorded
        "after_remove_claim",  # removal claimed, nothing sent yet
        "after_delete",  # mailcow deleted our row; not verified, not recorded
        "before_record_removal",  # deletion verified; the end state not committed
        "after_restore",  # the conflict's original row re-added; not recorded
        "after_reapply",  # reconcile re-added/edited our row; not recorded
        "after_deliver",  # mailcow asked to deliver an override's deferred mail; the release not recorded
    }
)

log = logging.getLogger("app.worker")
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here if the environment asks for it (tests only; unset in production)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] >= int(nth or "1"):
        log.critical("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
