"""Prometheus metrics: `/metrics` on the API, optionally a port on a standalone worker.

Counters and histograms (mailcow calls in `app.mailcow.client`, worker jobs here) live in each
process; with several processes set `PROMETHEUS_MULTIPROC_DIR` to a directory they all share and
`/metrics` adds them up. The numbers that describe the database (overrides by state, overdue,
conflicts, drift, the last successful reconcile per target) are computed at scrape time by
`DatabaseCollector`, so they are right whichever process is scraped and survive restarts.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from app.core.auth import OnBehalfOf, OnBehalfOfName, bearer_scheme, current_principal
from app.core.db import utcnow
from app.core.errors import Forbidden, problem_responses

log = logging.getLogger("app.metrics")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_HOST = socket.gethostname()


def _process_identifier() -> str:
    # prometheus_client names each process's files after its pid; in containers sharing one metrics
    # volume every process is pid 1, so two replicas would write the same file. Host (container) name
    # plus pid is unique; it is called on every update, so the host name is read once.
    return f"{_HOST}-{os.getpid()}"


if multiprocess_dir():
    # Before the first metric value is created (the metrics below, and every labelled child later).
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_identifier)  # type: ignore[no-untyped-call]

WORKER_JOBS = Counter("tlso_worker_jobs_total", "Worker job outcomes", ["job", "outcome"])
WORKER_LAG = Gauge(
    "tlso_worker_lag_seconds",
    "How late the worker started the latest due jobs (now minus their due time), per loop",
    multiprocess_mode="mostrecent",
)
WORKER_LAST_LOOP = Gauge(
    "tlso_worker_last_loop_timestamp_seconds",
    "When a worker last finished a loop iteration (alert if it stops moving)",
    multiprocess_mode="mostrecent",
)
DRIFT_EVENTS = Counter("tlso_drift_events_total", "Drift found by reconciliation", ["target", "kind"])


class _ProcessMetrics(Collector):
    """This process's own metrics (the default registry)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tlso_database_up", "Whether the metrics query reached the database")
        try:
            families = self._families()
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: database query failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[Metric]:
        from app.overrides.models import Override, OverrideState
        from app.targets.models import MailcowTarget

        now = utcnow()
        with Session(self.engine) as session:
            by_state = dict(session.exec(select(Override.state, func.count()).group_by(col(Override.state))).all())
            overdue = session.exec(
                select(func.count())
                .select_from(Override)
                .where(col(Override.state) == OverrideState.removing, col(Override.removal_deadline) < now)
            ).one()
            live = session.exec(
                select(Override.state, Override.conflict, Override.drift, Override.target).where(
                    col(Override.live).is_(True)
                )
            ).all()
            targets = session.exec(select(MailcowTarget)).all()

        states = GaugeMetricFamily("tlso_overrides", "Overrides by state", labels=["state"])
        for state in OverrideState:
            states.add_metric([state.value], float(by_state.get(state, 0)))
        overdue_family = GaugeMetricFamily(
            "tlso_overrides_overdue", "Overrides still being removed past their removal deadline"
        )
        overdue_family.add_metric([], float(overdue))
        conflicts = GaugeMetricFamily(
            "tlso_overrides_conflict", "Approved overrides blocked by a foreign mailcow row (an admin decides)"
        )
        conflicts.add_metric(
            [],
            float(
                sum(
                    1
                    for state, conflict, _, _ in live
                    if state == OverrideState.approved
                    and isinstance(conflict, dict)
                    and conflict.get("status") == "open"
                )
            ),
        )
        drifted = GaugeMetricFamily(
            "tlso_overrides_drift", "Active overrides whose mailcow row drifted", labels=["target"]
        )
        per_target: dict[str, int] = {}
        for row_state, _, drift, row_target in live:
            if row_state == OverrideState.active and drift:
                per_target[row_target] = per_target.get(row_target, 0) + 1
        for target, count in sorted(per_target.items()):
            drifted.add_metric([target], float(count))
        reconciled = GaugeMetricFamily(
            "tlso_reconcile_last_success_timestamp_seconds",
            "When each target's policy map was last reconciled successfully",
            labels=["target"],
        )
        paused = GaugeMetricFamily(
            "tlso_target_paused",
            "1 while calls to a target are paused after an authentication failure",
            labels=["target"],
        )
        rows = GaugeMetricFamily(
            "tlso_mailcow_rows", "Rows in each target's policy map at the last reconcile", labels=["target", "owner"]
        )
        for target_row in targets:
            if target_row.last_reconcile_at is not None:
                reconciled.add_metric([target_row.name], target_row.last_reconcile_at.timestamp())
            is_paused = target_row.paused_until is not None and target_row.paused_until > now
            paused.add_metric([target_row.name], 1.0 if is_paused else 0.0)
            rows.add_metric([target_row.name, "tlsoverride"], float(target_row.rows_owned))
            rows.add_metric([target_row.name, "foreign"], float(target_row.rows_foreign))
        return [states, overdue_family, conflicts, drifted, reconciled, paused, rows]


_DATABASE_COLLECTORS: list[Callable[[Engine], Collector]] = []


def register_database_collector(factory: Callable[[Engine], Collector]) -> None:
    """A domain package's gauges read from the database at scrape time (core imports no domain package)."""
    if factory not in _DATABASE_COLLECTORS:
        _DATABASE_COLLECTORS.append(factory)


def registry_for(engine: Engine) -> CollectorRegistry:
    """Everything a scrape shows: every process's metrics (or this one's) plus the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    registry.register(DatabaseCollector(engine))
    for factory in _DATABASE_COLLECTORS:
        registry.register(factory(engine))
    return registry


def render(engine: Engine) -> bytes:
    return generate_latest(registry_for(engine))


async def _scraper(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    on_behalf_of: OnBehalfOf = None,
    on_behalf_of_name: OnBehalfOfName = None,
) -> None:
    """A scrape needs a token with the admin or auditor role (Prometheus: `oauth2` client credentials),
    unless `TLSO_METRICS_PUBLIC=true` opens it for a scraper on a private network."""
    if request.app.state.settings.metrics_public:
        return
    principal = await current_principal(request, credentials, on_behalf_of, on_behalf_of_name)
    if not principal.has("admin", "auditor"):
        raise Forbidden("Metrics need one of the roles: admin, auditor.")


def metrics_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        dependencies=[Depends(_scraper)],
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
            **problem_responses(401, 403, 422, 503),
        },
    )
    def metrics(request: Request) -> Response:
        """Overrides by state, overdue removals, conflicts, drift, mailcow calls, worker lag, reconcile times.
        Needs the admin or auditor role unless `TLSO_METRICS_PUBLIC=true`."""
        return Response(render(request.app.state.engine), media_type=CONTENT_TYPE_LATEST)

    return router


def serve_worker_metrics(engine: Engine, port: int, host: str) -> Any:
    """A standalone worker's own `/metrics` (when it shares no multiprocess directory with the API).
    Plain HTTP without authentication: bind it to an address only the scraper reaches."""
    return start_http_server(port, addr=host, registry=registry_for(engine))
