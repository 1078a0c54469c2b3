"""Operational drills on PostgreSQL: what the API and the worker do when their dependencies fail.

* The database stops under API load: every answer while it is down is a `503` problem document (never a
  500, never a hang), and the same API process serves again once the database is back. The server
  that is stopped is a private cluster (tests/private_postgres.py), never the shared one.
* mailcow answers only after 30 s: the API's other requests do not wait for it, the live-map request
  gives up after `TLSO_MAILCOW_TIMEOUT_SECONDS`, and so does the worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.audit.service import verify_chain
from app.core.db import make_engine, reading
from app.core.devidp import DevIdentityProvider
from app.main import create_app
from app.overrides.models import OverrideState
from app.worker.loop import Worker
from devtools.mailcow_standin import StandinKey, create_standin_app
from tests.helpers import PROBLEM_JSON, VALID_REQUEST, LiveServer, assert_problem, audit_keys, load, make_settings
from tests.private_postgres import PrivatePostgres
from tests.standin import KEY
from tests.worker.helpers import approved

Auth = Callable[..., dict[str, str]]


@dataclass
class Answer:
    started: float
    finished: float
    status: int  # 0: no answer (transport error or client timeout)
    content_type: str
    body: str
    created_id: int | None = None


class Load:
    """Client threads that read one override and create new ones until stopped, logging every answer."""

    def __init__(self, base_url: str, headers: dict[str, str], override_id: int, threads: int = 4) -> None:
        self.base_url, self.headers, self.override_id = base_url, headers, override_id
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, n: int) -> None:
        # The client's timeout is the "hang" bound: an answer that takes longer is recorded as none.
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=15) as http:
            i = 0
            while not self._stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    if i % 2:
                        response = http.get(f"/v1/overrides/{self.override_id}")
                    else:
                        body = {**VALID_REQUEST, "destination": f"drill-{n}-{i}-{uuid.uuid4().hex[:6]}.example"}
                        response = http.post("/v1/overrides", json=body)
                except httpx.HTTPError as exc:
                    self._log(Answer(started, time.monotonic(), 0, "", repr(exc)))
                    continue
                created = response.json().get("id") if response.status_code == 201 else None
                self._log(
                    Answer(
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("content-type", ""),
                        response.text,
                        created,
                    )
                )

    def _log(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def since(self, moment: float) -> list[Answer]:
        with self._lock:
            return [answer for answer in self.answers if answer.started >= moment]

    def wait_for(self, what: Callable[[Answer], bool], count: int, after: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for answer in self.since(after) if what(answer)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen in {timeout}s; last answers: {self.since(after)[-3:]}")
            time.sleep(0.05)


def _ok(answer: Answer) -> bool:
    return answer.status in (200, 201)


def _unavailable(answer: Answer) -> bool:
    return answer.status == 503 and answer.content_type.startswith(PROBLEM_JSON)


@pytest.fixture
def drill_database(private_postgres: PrivatePostgres) -> Iterator[str]:
    yield private_postgres.create_database(f"drill_{uuid.uuid4().hex[:10]}")


def test_a_stopped_database_gives_503_and_the_api_recovers_by_itself(
    private_postgres: PrivatePostgres,
    drill_database: str,
    idp: DevIdentityProvider,
    auth: Auth,
) -> None:
    engine = make_engine(drill_database, pre_ping=False)  # as create_app makes it for `serve`
    app = create_app(make_settings(database_url=drill_database), engine=engine, dev_idp=idp)
    alice = auth("alice", "requester")
    try:
        with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=15) as http:
            first = http.post("/v1/overrides", json=VALID_REQUEST, headers=alice)
            assert first.status_code == 201, first.text
            with Load(server.url, alice, first.json()["id"]) as load_:
                load_.wait_for(_ok, 20, after=0, timeout=30)

                private_postgres.stop("fast")
                down = time.monotonic()
                load_.wait_for(_unavailable, 20, after=down, timeout=30)
                assert_problem(http.get("/readyz"), 503)
                outage = load_.since(down)

                private_postgres.start()
                back = time.monotonic()
                load_.wait_for(_ok, 20, after=back, timeout=30)
                settled = time.monotonic()
                load_.wait_for(_ok, 20, after=settled, timeout=30)

            answers = load_.answers
            # While the server was down (every request sent after `pg_ctl stop` returned): 503 problem+json.
            assert outage and all(_unavailable(a) for a in outage), {(a.status, a.body[:120]) for a in outage}
            assert all(a.body and '"status":503' in a.body for a in outage)
            # Never a 500, never an unanswered request, in the whole run.
            assert {a.status for a in answers} <= {200, 201, 503}, {(a.status, a.body[:200]) for a in answers}
            # Once it is back, the same API process answers normally again (no restart).
            assert all(_ok(a) for a in load_.since(settled)), {(a.status, a.body[:120]) for a in load_.since(settled)}
            assert http.get("/readyz").status_code == 200

        # Every create that was answered 201 is there, with its audit row, and the chain holds.
        created = {a.created_id for a in answers if a.created_id is not None} | {first.json()["id"]}
        with engine.connect() as conn:
            stored = set(conn.execute(sa.text("SELECT id FROM override")).scalars())
            audited = set(
                conn.execute(sa.text("SELECT override_id FROM audit_event WHERE action = 'override.created'")).scalars()
            )
        assert created <= stored and created <= audited
        with reading(engine) as session:
            assert verify_chain(session, audit_keys()).valid
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------------
# mailcow answers after 30 s

MAILCOW_DELAY = 30.0
TIMEOUT = 2.0  # TLSO_MAILCOW_TIMEOUT_SECONDS in this drill (the default is 10)


@pytest.fixture
def slow_mailcow() -> Iterator[str]:
    """The stand-in, served over real HTTP, answering every API call only after 30 s."""
    app = create_standin_app([StandinKey(KEY)])
    with LiveServer(app, lifespan="off") as server:
        armed = httpx.post(
            f"{server.url}/__standin__/faults",
            json={"op": "any", "mode": "timeout", "delay": MAILCOW_DELAY, "count": 1000},
        )
        assert armed.status_code == 200, armed.text
        yield server.url


def _slow_mailcow_settings(database_url: str, mailcow_url: str) -> Any:
    return make_settings(
        database_url=database_url,
        mailcow_url=mailcow_url,
        mailcow_api_key=KEY,
        mailcow_timeout_seconds=TIMEOUT,
        mailcow_attempts=2,
        mailcow_retry_backoff_seconds=0.01,
        retry_initial_seconds=60.0,
        worker_poll_seconds=0.2,
    )


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_slow_mailcow_does_not_slow_the_api(
    engine: Engine, database_url: str, slow_mailcow: str, idp: DevIdentityProvider, auth: Auth
) -> None:
    settings = _slow_mailcow_settings(database_url, slow_mailcow)
    app = create_app(settings, engine=engine, dev_idp=idp)
    admin = auth("root", "admin")
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        override_id = http.post("/v1/overrides", json=VALID_REQUEST, headers=auth("alice", "requester")).json()["id"]
        live_maps: list[tuple[float, httpx.Response]] = []

        def read_live_map() -> None:
            started = time.monotonic()
            response = httpx.get(f"{server.url}/v1/targets/default/policies", headers=admin, timeout=60)
            live_maps.append((time.monotonic() - started, response))

        waiting = [threading.Thread(target=read_live_map) for _ in range(4)]
        sent = time.monotonic()
        for thread in waiting:
            thread.start()
        reads = []
        for _ in range(10):  # the API's own work, while four requests wait on mailcow
            response = http.get(f"/v1/overrides/{override_id}", headers=admin)
            assert response.status_code == 200, response.text
            reads.append(time.monotonic())
        still_waiting = [thread.is_alive() for thread in waiting]
        for thread in waiting:
            thread.join(60)

    # The reads were answered while every live-map request was still waiting on mailcow: they did not queue
    # behind it. (Each live-map request waits at least TIMEOUT, so this is an order, not a stopwatch.)
    assert all(still_waiting) and reads[-1] - sent < TIMEOUT, (reads[-1] - sent, still_waiting)
    # The live-map requests gave up after the configured timeout (one attempt), not after mailcow's 30 s
    # nor after the default timeout.
    assert len(live_maps) == 4
    for elapsed, response in live_maps:
        assert_problem(response, 503)
        assert TIMEOUT <= elapsed < 3 * TIMEOUT, elapsed


@pytest.mark.parametrize("backend", ["postgres"])
async def test_the_worker_gives_up_on_a_slow_mailcow_after_its_timeout(
    engine: Engine, database_url: str, slow_mailcow: str, client: Any, auth: Auth
) -> None:
    override_id = approved(client, auth, "slow.example.org")
    settings = _slow_mailcow_settings(database_url, slow_mailcow)
    worker = Worker(engine, settings, owner="w1")
    try:
        started = time.monotonic()
        await worker.tick()
        elapsed = time.monotonic() - started
    finally:
        await worker.aclose()
    override = load(engine, override_id)
    # Two attempts of TIMEOUT each (not of the default 10 s, nor mailcow's 30 s), then the add is left for a
    # later pass (its outcome is unknown).
    assert 2 * TIMEOUT <= elapsed < 3 * 2 * TIMEOUT, elapsed
    assert override.state == OverrideState.approved
    assert override.last_error and "tim" in override.last_error.lower(), override.last_error
    assert override.next_attempt_at is not None
