"""Memory of failure on a real, throwaway PostgreSQL: the same scenario as on SQLite
(``tests/rollout_memory.py``): abort, refusal, override, quarantine, history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.store import Registry
from fleet_server.registry.version_history import version_history
from pg import PgCluster
from rollout_memory import IDS, RecordingService, memory_scenario

pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")


def test_memory_of_failure_on_postgresql(pg: PgCluster) -> None:
    now = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]

    def clock() -> datetime:
        now[0] += timedelta(seconds=1)  # distinct times: the history is in order
        return now[0]

    registry = Registry.open(pg.new_database(), clock=clock)
    runner = RolloutRunner(registry, RecordingService(), clock)
    try:
        registry.upgrade()
        for d in IDS:
            registry.enroll(d, group="line-3")
        for v in (1, 2):
            registry.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64,
                                    length=10, targets_sha256=f"{v + 2}" * 64)  # fmt: skip
        memory_scenario(registry, runner, lambda: runner.step() and None)  # asserts each step
        # What PostgreSQL kept at the end (read back through a fresh query).
        h = version_history(registry, "digits", 2)[("digits", 2)]
        assert h.status == "quarantined"
        assert sorted(o["kind"] for o in h.overrides) == ["aborted", "quarantine"]
    finally:
        runner.close()
        registry.close()
