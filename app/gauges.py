"""The gauges that describe the database, read at every scrape (`app.core.metrics` asks for them: the API's
`/metrics` and a standalone worker's port). Computed from the tables, they are right whichever process
is scraped, and survive restarts."""

from __future__ import annotations

from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func
from sqlmodel import Session, col, select

from app.core.db import utcnow
from app.notify.metrics import notification_gauges
from app.overrides.models import ConflictStatus, Override, OverrideState, conflict_status_of
from app.targets.models import MailcowTarget


def database_gauges(session: Session) -> list[Metric]:
    now = utcnow()
    return [*override_gauges(session, now), *target_gauges(session, now), *notification_gauges(session, now)]


def override_gauges(session: Session, now: datetime) -> list[Metric]:
    """Overrides by state, removals overdue, conflicts waiting for an admin, drift and overrides that do not
    let the mail through, per target."""
    by_state = dict(session.exec(select(Override.state, func.count()).group_by(col(Override.state))).all())
    overdue = session.exec(
        select(func.count())
        .select_from(Override)
        .where(col(Override.state) == OverrideState.removing, col(Override.removal_deadline) < now)
    ).one()
    live = session.exec(
        select(Override.state, Override.conflict, Override.drift, Override.target).where(col(Override.live).is_(True))
    ).all()
    active_queue = session.exec(
        select(Override.target, Override.queue_release).where(col(Override.state) == OverrideState.active)
    ).all()

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
                and conflict_status_of(conflict) == ConflictStatus.open
            )
        ),
    )
    drifted = GaugeMetricFamily("tlso_overrides_drift", "Active overrides whose mailcow row drifted", labels=["target"])
    per_target: dict[str, int] = {}
    stuck = GaugeMetricFamily(
        "tlso_overrides_still_stuck",
        "Active overrides whose destination's mail was still deferred for TLS after the release (not working)",
        labels=["target"],
    )
    stuck_per_target: dict[str, int] = {}
    for row_state, _, drift, row_target in live:
        if row_state == OverrideState.active and drift:
            per_target[row_target] = per_target.get(row_target, 0) + 1
    for row_target, queue_release in active_queue:
        if isinstance(queue_release, dict) and queue_release.get("still_stuck"):
            stuck_per_target[row_target] = stuck_per_target.get(row_target, 0) + 1
    for target, count in sorted(per_target.items()):
        drifted.add_metric([target], float(count))
    for target, count in sorted(stuck_per_target.items()):
        stuck.add_metric([target], float(count))
    return [states, overdue_family, conflicts, drifted, stuck]


def target_gauges(session: Session, now: datetime) -> list[Metric]:
    """Per target: the last successful reconcile, a running pause, the rows at the last reconcile."""
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
    for target_row in session.exec(select(MailcowTarget)).all():
        if target_row.last_reconcile_at is not None:
            reconciled.add_metric([target_row.name], target_row.last_reconcile_at.timestamp())
        is_paused = target_row.paused_until is not None and target_row.paused_until > now
        paused.add_metric([target_row.name], 1.0 if is_paused else 0.0)
        rows.add_metric([target_row.name, "tlsoverride"], float(target_row.rows_owned))
        rows.add_metric([target_row.name, "foreign"], float(target_row.rows_foreign))
    return [reconciled, paused, rows]
