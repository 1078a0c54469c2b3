"""Schemathesis against the checked-in OpenAPI document, one run per caller kind.

The app is built as the other tests build it (dev identity provider, real JWT validation, a database made by
the migrations), with a mailcow target on the stand-in and the diagnosis on the DNS lab, and holds a few
overrides of another user in several states, so that every role has something to read and act on. Every
phase runs: the document's examples, coverage (boundary values, wrong types, methods a path does not offer),
fuzzing, and the stateful phase, which follows the links Schemathesis infers (create → get, events, every
action; list → the same) and the `Location` headers it sees.

What must hold for every answer: no 5xx; status, content type, headers and body as documented; invalid
input refused; every error `application/problem+json`; 405 with `Allow`; authentication not ignored.
Bounded and derandomized (fixed seed, no example database), so a run is repeatable and takes seconds.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.engine import events, from_schema
from sqlalchemy.engine import Engine

from app.cli import OPENAPI_FILE
from app.core.config import Settings
from app.core.errors import PROBLEM_JSON
from tests.helpers import COMMENT, VALID_REQUEST, Headers, apply_now, lab_settings
from tests.lab.lab import Lab
from tests.standin import KEY, make_app, served

# Per operation: examples of the fuzzing phase; per run: scenarios and steps of the stateful phase. Small
# enough for CI (about 2 minutes for all 11 runs on 2 cores); TLSO_SCHEMATHESIS_SCALE=10 digs ten times deeper.
SCALE = int(os.environ.get("TLSO_SCHEMATHESIS_SCALE", "1"))
FUZZ_EXAMPLES = 10 * SCALE
STATEFUL_SCENARIOS = 10 * SCALE
STATEFUL_STEPS = 8 + 2 * SCALE
SEED = int(os.environ.get("TLSO_SCHEMATHESIS_SEED", "20261207"))

# Who calls: roles in the token, and the user an integration acts for (X-On-Behalf-Of).
CALLERS: dict[str, tuple[list[str], str | None]] = {
    "requester": (["requester"], None),
    "approver": (["approver"], None),
    "admin": (["admin"], None),
    "auditor": (["auditor"], None),
    "integration": (["integration"], None),
    "integration-on-behalf": (["integration"], "erin"),
    "no-role": ([], None),
}


@schemathesis.check
def problem_json(ctx: Any, response: Any, case: Any) -> None:
    """Every error is an RFC 9457 problem document, whatever the document says about it."""
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        if not content_type.startswith(PROBLEM_JSON):
            raise AssertionError(f"a {response.status_code} answer is {content_type!r}, not {PROBLEM_JSON}")


@dataclass
class Run:
    """What one Schemathesis run generated and found."""

    cases: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    succeeded: Counter[str] = field(default_factory=Counter)  # 2xx answers per operation, all phases

    def record(self, event: events.ScenarioFinished) -> None:
        recorder = event.recorder
        self.cases[event.phase.value] += len(recorder.cases)
        for case_id, node in recorder.cases.items():
            interaction = recorder.interactions.get(case_id)
            if interaction is not None and interaction.response is not None and interaction.response.status_code < 300:
                self.succeeded[node.value.operation.label] += 1
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.status.value != "failure" or check.failure_info is None:
                    continue
                interaction = recorder.interactions.get(case_id)
                answer = interaction.response if interaction is not None else None
                seen = f"{answer.status_code} {answer.content[:300]!r}" if answer is not None else "no answer"
                self.failures.append(
                    f"[{event.phase.value}] {check.name}: {check.failure_info.failure.title}\n"
                    f"{check.failure_info.failure.message}\n{check.failure_info.code_sample}\n→ {seen}"
                )


def run_schemathesis(app: FastAPI, headers: Headers) -> Run:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": headers,
            "cache": {"enabled": False},
            "generation": {"max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {
                "stateful": {
                    "max-steps": STATEFUL_STEPS,
                    "generation": {"max-examples": STATEFUL_SCENARIOS},
                },
            },
            # Valid input is refused for good reasons here (roles, states, If-Match): not a finding.
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_dict(json.loads(OPENAPI_FILE.read_text(encoding="utf-8")), config=config)
    schema.app = app
    run = Run()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            run.record(event)
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"error in {event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"fatal: {event.exception!r}")
    return run


@pytest.fixture(scope="module")
def mailcow_url() -> Iterator[str]:
    with served(make_app()) as url:
        yield url


@pytest.fixture
def settings(dane_lab: Lab, mailcow_url: str) -> Settings:
    return lab_settings(dane_lab, mailcow_url=mailcow_url, mailcow_api_key=KEY)


@pytest.fixture
def seeded(client: TestClient, engine: Engine, auth: Callable[..., Headers]) -> None:
    """Overrides of carol's in four states: pending, approved, active, active with an extension asked."""
    carol, dave = auth("carol", "requester"), auth("dave", "approver")
    ids = []
    for n in range(4):
        response = client.post("/v1/overrides", json={**VALID_REQUEST, "destination": f"s{n}.example"}, headers=carol)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    for override_id in ids[1:]:
        assert client.post(f"/v1/overrides/{override_id}/approve", json=COMMENT, headers=dave).status_code == 200
    for override_id in ids[2:]:
        apply_now(engine, override_id)
    extend = client.post(f"/v1/overrides/{ids[3]}/extend", json={**COMMENT, "duration": "P1D"}, headers=carol)
    assert extend.status_code == 200, extend.text


# Every caller on PostgreSQL (production); on SQLite the callers that write, which is where the two differ
# (locking, constraint errors): the read-only ones would add a minute of CI for the same code paths.
RUNS = [(caller, "postgres") for caller in CALLERS] + [
    (caller, "sqlite") for caller in ("requester", "approver", "admin", "integration-on-behalf")
]


@pytest.mark.parametrize(("caller", "backend"), RUNS)
def test_api_holds_its_document(
    app: FastAPI, idp: Any, auth: Callable[..., Headers], seeded: None, caller: str, backend: str
) -> None:
    roles, on_behalf_of = CALLERS[caller]
    client_id = "ticketing" if "integration" in roles else None
    headers = auth(f"{caller}-user", *roles, client_id=client_id, on_behalf_of=on_behalf_of)
    run = run_schemathesis(app, headers)
    print(f"schemathesis {caller} on {backend}: {sum(run.cases.values())} cases {dict(run.cases)}")
    print(f"  2xx answers: {dict(sorted(run.succeeded.items()))}")
    assert run.cases["coverage"] and run.cases["fuzzing"] and run.cases["stateful"], run.cases
    assert not run.failures, f"{len(run.failures)} failures:\n\n" + "\n\n".join(run.failures)
