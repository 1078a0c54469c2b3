"""Notification metrics: attempts and failures counted where they happen, backlog and dead letters read
from the database at scrape time (right whichever process is scraped; app/gauges.py asks for them)."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func
from sqlmodel import Session, col, select

from app.audit.models import AuditEvent
from app.notify.models import Notification, NotificationCursor, NotificationState

ATTEMPTS = Counter("tlso_notification_attempts_total", "Delivery attempts per sink and outcome", ["sink", "outcome"])
FAILURES = Counter("tlso_notification_failures_total", "Failed delivery attempts per sink", ["sink"])
DEAD_LETTERS = Counter("tlso_notification_dead_letters_total", "Events given up after every attempt", ["sink"])


def notification_gauges(session: Session, now: datetime) -> list[Metric]:
    """Per sink: how far behind the trail it is, and its deliveries waiting for a retry or an admin."""
    lag = GaugeMetricFamily(
        "tlso_notification_lag_seconds",
        "Age of the oldest event a sink has not handled yet (0 when it is caught up)",
        labels=["sink"],
    )
    waiting = GaugeMetricFamily(
        "tlso_notifications",
        "Deliveries that failed, by sink and state (retrying, failed)",
        labels=["sink", "state"],
    )
    lags: dict[str, float] = {}
    for cursor in session.exec(select(NotificationCursor)).all():
        oldest = session.get(AuditEvent, cursor.last_seq + 1)
        lags[cursor.sink] = max(0.0, (now - oldest.at).total_seconds()) if oldest else 0.0
    counts = session.exec(
        select(Notification.sink, Notification.state, func.count())
        .where(col(Notification.state) != NotificationState.delivered)
        .group_by(col(Notification.sink), col(Notification.state))
    ).all()
    values = {(sink, state): 0.0 for sink in lags for state in ("retrying", "failed")}
    values.update({(sink, str(state)): float(n) for sink, state, n in counts})
    for sink, seconds in sorted(lags.items()):
        lag.add_metric([sink], seconds)
    for (sink, state), value in sorted(values.items()):
        waiting.add_metric([sink, state], value)
    return [lag, waiting]
