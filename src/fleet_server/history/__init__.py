"""Telemetry that lasts: exact rollups of raw telemetry and range-bounded reads.

Owns: the rollup cell (5-minute and hourly, per device and model version) and its exact merge
(``cells``), the range reads that fleet drift and rollouts use (``queries``, ``rollouts``), and
the storage side of raw retention: PostgreSQL's daily partitions of ``telemetry``, batched
deletes and pruning of the dedupe keys (``retention``). Does
not own: the job that folds closed buckets and applies retention (``fleet_server.jobs.history``),
ingest (``fleet_server.registry``), scoring (``fleet_server.drift``,
``fleet_server.rollouts.metrics``). The design and its figures are in ``docs/scale-out.md``.
"""
