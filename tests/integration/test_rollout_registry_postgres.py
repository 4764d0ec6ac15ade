"""Rollout persistence and the 0002 migration on a real, throwaway PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect

from fleet_server.registry import rollouts as store
from fleet_server.registry.store import Registry
from fleet_server.rollouts.engine import Rollout, RolloutPolicy, Selector, decide
from fleet_server.rollouts.metrics import DeviceObservation
from pg import PgCluster

pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {"rollouts", "rollout_events", "quarantine"}


def test_rollouts_on_postgresql(pg: PgCluster) -> None:
    reg = Registry.open(pg.new_database())
    try:
        reg.upgrade()
        r = Rollout("ro-1", "digits", 1, 2, Selector(group="g"), RolloutPolicy(), created_at=T0)
        store.create_rollout(reg, r, T0)
        d = decide(r, [DeviceObservation(f"dev-{i}", 1) for i in range(20)], T0)
        store.save_rollout(reg, d.rollout, T0, [("decision", {"assign": list(d.assign)})])
        assert store.get_rollout(reg, r.id) == d.rollout
        store.quarantine_version(reg, "digits", 2, "x", T0)
        store.quarantine_version(reg, "digits", 2, "x", T0)
        assert store.quarantined(reg, "digits", 2)
        reg.downgrade("0001")
        assert not TABLES & set(inspect(reg.engine).get_table_names())
        reg.upgrade()
        assert set(inspect(reg.engine).get_table_names()) >= TABLES
    finally:
        reg.close()
