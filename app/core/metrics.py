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
from sqlalchemy import Engine
from sqlmodel import Session

from app.core.auth import OnBehalfOf, OnBehalfOfName, bearer_scheme, caller
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


# The gauges that describe the database, read at scrape time: the domain defines them (`app.gauges`),
# `create_app` and the worker hand them over.
Gauges = Callable[[Session], list[Metric]]


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time."""

    def __init__(self, engine: Engine, gauges: Gauges) -> None:
        self.engine = engine
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tlso_database_up", "Whether the metrics query reached the database")
        try:
            with Session(self.engine) as session:
                families = self.gauges(session)
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: database query failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def registry_for(engine: Engine, gauges: Gauges) -> CollectorRegistry:
    """Everything a scrape shows: every process's metrics (or this one's) plus the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    registry.register(DatabaseCollector(engine, gauges))
    return registry


def render(engine: Engine, gauges: Gauges) -> bytes:
    return generate_latest(registry_for(engine, gauges))


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
    principal = await caller(request)
    if not principal.has("admin", "auditor"):
        raise Forbidden(principal.lacks("admin", "auditor", to="read the metrics"))


def metrics_router(gauges: Gauges) -> APIRouter:
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
        return Response(render(request.app.state.engine, gauges), media_type=CONTENT_TYPE_LATEST)

    return router


def serve_worker_metrics(engine: Engine, gauges: Gauges, port: int, host: str) -> Any:
    """A standalone worker's own `/metrics` (when it shares no multiprocess directory with the API).
    Plain HTTP without authentication: bind it to an address only the scraper reaches."""
    return start_http_server(port, addr=host, registry=registry_for(engine, gauges))
