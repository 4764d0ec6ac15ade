"""The capture tables on both backends (SQLite and a real PostgreSQL): migration 0011 up and
down without drift from the ORM, and the queries' round trip."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from clock import FakeClock
from fleet_server.errors import UnknownDatasetError
from fleet_server.registry.ops import datasets as rows
from fleet_server.registry.ops.datasets import CapturePolicy, DatasetRecord
from fleet_server.registry.schema import METADATA
from fleet_server.registry.store import Registry

TABLES = {"capture_policies", "capture_devices", "datasets"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(registry_url: str, clock: FakeClock) -> Iterator[Registry]:
    reg = Registry.open(registry_url, clock=clock.wall)
    reg.upgrade()
    yield reg
    reg.close()


def test_migration_0011_up_and_down_without_drift(registry: Registry, clock: FakeClock) -> None:
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert [d for d in diffs if any(t in repr(d) for t in TABLES)] == []
    policy = CapturePolicy("digits", True, {"group": "g"}, 10, 100, 65536, ("labels",), clock.utc)
    rows.put_capture_policy(registry, policy)
    registry.downgrade("0010")
    assert not TABLES & set(inspect(registry.engine).get_table_names())
    registry.upgrade()
    assert set(inspect(registry.engine).get_table_names()) >= TABLES
    assert rows.capture_policies(registry) == []  # the downgrade dropped them


def test_round_trip(registry: Registry, clock: FakeClock) -> None:
    policy = CapturePolicy(
        "digits", True, {"devices": ["a", "b"]}, 250_000, 1 << 20, 65536, ("metadata",), clock.utc
    )
    rows.put_capture_policy(registry, policy)
    assert rows.capture_policy(registry, "digits") == policy
    off = CapturePolicy(**{**policy.__dict__, "enabled": False})
    rows.put_capture_policy(registry, off)
    assert rows.capture_policies(registry) == [off]

    rows.record_chunk(registry, "digits", "a", device_counts={"not_sampled": 3})
    state = rows.record_chunk(
        registry, "digits", "a", ack_sha256="c" * 64, records=5, refused_records=1, at=clock.utc
    )
    assert (state.chunks, state.records, state.refused_records) == (1, 5, 1)
    assert state.device_counts == {"not_sampled": 3}
    rows.record_chunk(registry, "digits", "a", ack_sha256="d" * 64, refused=True, at=clock.utc)
    (state,) = rows.capture_devices(registry, "digits")
    assert (state.ack_sha256, state.refused_chunks) == ("d" * 64, 1)

    record = DatasetRecord(
        "e" * 64, "digits", 1000, 5, 7, 3, 1.5, 9.5, clock.utc, {"devices": ["a"], "versions": [1]}
    )
    assert rows.add_dataset(registry, record) == (record, True)
    clock.advance(timedelta(seconds=5).total_seconds())
    later = DatasetRecord("f" * 64, "digits", 10, 1, 1, 0, 2.0, 2.0, clock.utc, {})
    rows.add_dataset(registry, later)
    assert rows.add_dataset(registry, record)[1] is False  # the same digest: kept once
    assert [d.sha256 for d in rows.list_datasets(registry, "digits")] == ["f" * 64, "e" * 64]
    assert rows.get_dataset(registry, "e" * 64) == record
    with pytest.raises(UnknownDatasetError):
        rows.get_dataset(registry, "0" * 64)
