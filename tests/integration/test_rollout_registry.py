"""Rollout persistence on a real registry, SQLite and PostgreSQL (``registry_url``): round trip,
events, quarantine, migrations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from fleet_server.errors import RegistryError, UnknownRolloutError
from fleet_server.registry import rollouts as store
from fleet_server.registry.schema import METADATA
from fleet_server.registry.store import Registry
from fleet_server.rollouts.engine import decide
from fleet_server.rollouts.metrics import DeviceObservation
from fleet_server.rollouts.policy import RolloutPolicy, Selector, Thresholds
from fleet_server.rollouts.state import Rollout

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {"rollouts", "rollout_events", "quarantine"}


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry.open(registry_url, clock=lambda: T0)
    reg.upgrade()
    yield reg
    reg.close()


def _rollout(rid: str = "ro-1") -> Rollout:
    policy = RolloutPolicy(
        exponential=2.0, approval=True, thresholds=Thresholds(min_shadow_agreement=0.9)
    )
    return Rollout(rid, "digits", 1, 2, Selector(tags={"site": "a"}), policy, created_at=T0)


def test_migration_upgrade_and_downgrade(registry: Registry) -> None:
    head = registry.current_revision()
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert [d for d in diffs if any(t in repr(d) for t in TABLES)] == []
    registry.downgrade("0001")
    assert registry.current_revision() == "0001"
    assert not TABLES & set(inspect(registry.engine).get_table_names())
    registry.upgrade("0002")
    assert set(inspect(registry.engine).get_table_names()) >= TABLES
    registry.upgrade()
    assert registry.current_revision() == head


def test_round_trip_with_a_decided_state(registry: Registry) -> None:
    r = _rollout()
    store.create_rollout(registry, r, T0)
    with pytest.raises(RegistryError):
        store.create_rollout(registry, r, T0)
    devices = [DeviceObservation(f"dev-{i}", 1, 1, "installed") for i in range(5)]
    d = decide(r, devices, T0 + timedelta(seconds=1))
    store.save_rollout(registry, d.rollout, T0, [("decision", {"assign": list(d.assign)})])
    back = store.get_rollout(registry, r.id)
    assert back == d.rollout
    assert [e.kind for e in store.rollout_events(registry, r.id)] == ["created", "decision"]
    assert [x.id for x in store.list_rollouts(registry, states=["dwelling"])] == [r.id]
    assert store.list_rollouts(registry, states=["pending"]) == []
    with pytest.raises(UnknownRolloutError):
        store.get_rollout(registry, "ro-nope")
    with pytest.raises(UnknownRolloutError):
        store.save_rollout(registry, _rollout("ro-nope"), T0)


def test_default_policy_group_rollout_round_trip_and_migration(registry: Registry) -> None:
    """Was the PostgreSQL-only test: a group selector and the default policy."""
    r = Rollout("ro-1", "digits", 1, 2, Selector(group="g"), RolloutPolicy(), created_at=T0)
    store.create_rollout(registry, r, T0)
    d = decide(r, [DeviceObservation(f"dev-{i}", 1) for i in range(20)], T0)
    store.save_rollout(registry, d.rollout, T0, [("decision", {"assign": list(d.assign)})])
    assert store.get_rollout(registry, r.id) == d.rollout
    store.quarantine_version(registry, "digits", 2, "x", T0)
    store.quarantine_version(registry, "digits", 2, "x", T0)
    assert store.quarantined(registry, "digits", 2)
    registry.downgrade("0001")
    assert not TABLES & set(inspect(registry.engine).get_table_names())
    registry.upgrade()
    assert set(inspect(registry.engine).get_table_names()) >= TABLES


def test_quarantine_and_abort_count(registry: Registry) -> None:
    r = _rollout()
    store.create_rollout(registry, r, T0)
    store.save_rollout(registry, replace(r, state="aborted", breached=True), T0)
    assert store.breach_aborts(registry, "digits", 2) == 1
    assert store.breach_aborts(registry, "digits", 3) == 0
    store.quarantine_version(registry, "digits", 2, "two aborts", T0)
    store.quarantine_version(registry, "digits", 2, "again", T0)
    assert store.quarantined(registry, "digits", 2)
    assert not store.quarantined(registry, "digits", 1)
    assert [(q.model, q.version, q.reason) for q in store.list_quarantine(registry)] == [
        ("digits", 2, "two aborts")
    ]
