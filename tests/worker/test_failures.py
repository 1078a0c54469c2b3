"""app.worker.failures: what happens when mailcow says no, sorted without a network (the jobs that act on
it are tested against the stand-in in test_jobs.py, test_pause.py and test_edges.py)."""

from __future__ import annotations

import pytest

from app.mailcow.errors import (
    MailcowAuthError,
    MailcowEmptyResponse,
    MailcowError,
    MailcowProtocolError,
    MailcowRejected,
    MailcowUnavailable,
)
from app.worker.failures import Call, Verdict, verdict

DEST_INVALID = MailcowRejected("add: Policy destination is invalid", msg_key="tls_policy_map_dest_invalid")
EXISTS = MailcowRejected("add: exists", msg_key="tls_policy_map_entry_exists")
RETRY, FAIL, PAUSE = Verdict.retry, Verdict.fail, Verdict.pause

# error → (add on its 1st of 3 attempts, add on its 3rd of 3, restore, upkeep)
CASES: list[tuple[BaseException, tuple[Verdict, Verdict, Verdict, Verdict]]] = [
    (MailcowAuthError("401"), (PAUSE, PAUSE, PAUSE, PAUSE)),
    (MailcowUnavailable("HTTP 503"), (RETRY, RETRY, RETRY, RETRY)),
    (MailcowEmptyResponse("empty"), (RETRY, RETRY, RETRY, RETRY)),
    (MailcowError("other"), (RETRY, RETRY, RETRY, RETRY)),
    (MailcowProtocolError("HTTP 404"), (RETRY, FAIL, RETRY, RETRY)),
    (EXISTS, (RETRY, FAIL, FAIL, RETRY)),
    (DEST_INVALID, (FAIL, FAIL, FAIL, RETRY)),
    (ValueError("parameters too long"), (FAIL, FAIL, FAIL, RETRY)),
]


@pytest.mark.parametrize(
    ("error", "expected"), CASES, ids=[type(e).__name__ + str(i) for i, (e, _) in enumerate(CASES)]
)
def test_every_error_is_sorted_for_every_kind_of_call(
    error: BaseException, expected: tuple[Verdict, Verdict, Verdict, Verdict]
) -> None:
    got = (
        verdict(error, Call.add, attempts=1, max_attempts=3),
        verdict(error, Call.add, attempts=3, max_attempts=3),
        verdict(error, Call.restore),
        verdict(error, Call.upkeep),
    )
    assert got == expected
