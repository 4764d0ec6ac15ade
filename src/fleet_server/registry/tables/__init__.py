"""The registry's SQLAlchemy tables, by area: ``core`` (devices, bundles, desired and reported
state, telemetry, rollups, accounts), ``rollouts``, ``evalsets``, ``labels``. Migrations
create them; the repository modules one level up read and write them. Import each name from
its module; this package re-exports nothing.
"""
