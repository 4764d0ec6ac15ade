"""Telemetry that lasts: exact rollups of raw telemetry, retention, and range-bounded reads.

Owns: folding closed buckets of raw rows into per-device, per-model-version rollups (5-minute
and hourly), deleting raw rows and rollups past their retention (``job``), the rollup cell and
its exact merge (``cells``), and the range reads that fleet drift and rollouts use
(``queries``). Does not own: ingest (``registry``), scoring (``fleet_drift``,
``rollout_metrics``). The design and its figures are in ``docs/scale-out.md``.
"""

from fleet_server.history.cells import (
    DriftPart,
    RawRow,
    RollupCell,
    edges_digest,
    fold_rows,
    merge_cells,
)
from fleet_server.history.job import FINE, HOUR, HistoryJob, HistoryPolicy, RunReport, floor_to
from fleet_server.history.queries import (
    DriftInputs,
    RangePlan,
    drift_inputs,
    last_reports,
    plan_range,
)
from fleet_server.history.rollouts import RolloutInputs, rollout_inputs

__all__ = [
    "FINE",
    "HOUR",
    "DriftInputs",
    "DriftPart",
    "HistoryJob",
    "HistoryPolicy",
    "RangePlan",
    "RawRow",
    "RolloutInputs",
    "RollupCell",
    "RunReport",
    "drift_inputs",
    "edges_digest",
    "floor_to",
    "fold_rows",
    "last_reports",
    "merge_cells",
    "plan_range",
    "rollout_inputs",
]
