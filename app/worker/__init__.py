"""The worker: applies approved overrides to mailcow, removes ended ones, reconciles drift.

Every job claims its rows (a lease, taken with `FOR UPDATE SKIP LOCKED` on PostgreSQL), talks to
mailcow outside any database transaction, and records the outcome in a second short transaction that
compare-and-sets the override through `app.overrides.lifecycle`. Several workers may run against
PostgreSQL; SQLite runs exactly one.
"""
