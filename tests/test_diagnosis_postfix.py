"""app.diagnosis agrees with Postfix itself (posttls-finger, level dane) on every lab domain.

posttls-finger only sees the lab on ports 53 and 25, so the whole run happens inside a private
network+mount+pid namespace (tests/lab/netns.py, dane.md §3.5). Needs root, unshare, iproute2 and
the postfix package; skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.diagnosis import Diagnosis
from tests.lab.netns import run_in_namespace, unavailable_reason
from tests.lab.topology import SCENARIO_DOMAINS

pytestmark = [pytest.mark.netns, pytest.mark.lab]


@pytest.fixture(scope="module")
def postfix_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"posttls-finger comparison skipped: {reason}")
    return run_in_namespace(Path(tmp_path_factory.mktemp("netns")))


def postfix_verdict(view: dict[str, Any]) -> str:
    hosts = [h["delivers"] for h in view["hosts"].values()]
    if not hosts or not any(hosts):
        return "blocked"
    return "ok" if all(hosts) else "degraded"


ADDRESS_LIMIT = 5  # Postfix's smtp_mx_address_limit default


@pytest.mark.parametrize("domain", SCENARIO_DOMAINS)
def test_verdict_agrees_with_posttls_finger(postfix_view: dict[str, Any], domain: str) -> None:
    entry = postfix_view[domain]
    diagnosis = Diagnosis.model_validate(entry["diagnosis"])
    postfix = entry["postfix"]
    context = f"{domain}: ours {diagnosis.verdict}/{diagnosis.failure_class}; postfix {postfix['domain']['reason']}"

    # Postfix never gets to hosts past smtp_mx_address_limit (5 addresses, in preference order; mailcow keeps
    # the default); posttls-finger on a bracketed host does. The set is worked out here, not taken from
    # our own statuses, so a wrong plan in the diagnosis would show.
    tried, budget = [], ADDRESS_LIMIT
    for host in sorted(diagnosis.hosts, key=lambda h: h.preference):
        if budget <= 0:
            break
        tried.append(host)
        budget -= len(host.addresses)
    assert [h.name for h in tried] == [h.name for h in diagnosis.hosts if h.tried], context
    assert diagnosis.verdict == postfix_verdict({"hosts": {h.name: postfix["hosts"][h.name] for h in tried}}), context
    for host in tried:
        theirs = postfix["hosts"][host.name]
        assert host.would_deliver == theirs["delivers"], f"{context}; {host.name}: {theirs['reason']}"
        if theirs["pkey_fingerprint"]:
            # mailcow's digest is sha256 (compatibility level >= 3.6): the value `fingerprint match=` needs.
            assert host.pkey_fingerprint == theirs["pkey_fingerprint"], context

    # posttls-finger on the domain stops at the first MX host that completes TLS (dane.md §1.1).
    first = postfix["domain"]
    if diagnosis.hosts:
        assert diagnosis.hosts[0].would_deliver == first["delivers"], context
        ours_tls = diagnosis.hosts[0].addresses[0].postfix_tls if diagnosis.hosts[0].addresses else None
        if first["delivers"] and first["tls"]:
            assert ours_tls == first["tls"], context
    else:
        assert first["delivers"] is False, context

    # The recommended fingerprint override, applied by posttls-finger as Postfix would (no SNI).
    if diagnosis.recommended is not None and diagnosis.recommended.policy == "fingerprint":
        assert postfix["fingerprint"], context
        for name, result in postfix["fingerprint"].items():
            assert result["tls"] == "Verified", f"{context}; fingerprint override on {name}: {result['reason']}"
