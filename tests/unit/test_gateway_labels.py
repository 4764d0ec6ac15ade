"""Reported labels through the gateway (in-memory broker, real registry): a device's valid
labels become its own labels in the registry, the invalid ones are dropped and counted (the
gateway's ``reported_labels_refused`` counter and the device's ``labels_refused``), the rest of
its reported state is stored all the same, and an operator's label keeps winning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from clock import FakeClock
from edge_agent.common.memory import MemoryBroker
from edge_agent.wire.topics import Topics
from fleet_server.config import GatewayConfig
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry import labels as label_store
from fleet_server.registry.store import Registry

T = Topics()
WAIT = 10.0


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    r.upgrade()
    r.enroll("dev-1", group="test")
    yield r
    r.close()


def _reported(labels: object) -> bytes:
    doc = {
        "schema_version": 1,
        "type": "reported",
        "device_id": "dev-1",
        "at": 1.0,
        "models": {"digits": {"active": 1, "outcome": "installed"}},
        "labels": labels,
    }
    return json.dumps(doc).encode()


def test_reported_labels_are_kept_valid_counted_otherwise(
    tmp_path: Path, registry: Registry
) -> None:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock, blocking=True)
    server = broker.client("fleet.server")
    config = GatewayConfig(bundles_dir=tmp_path / "bundles", ingest_max_wait_seconds=0.0)
    config.bundles_dir.mkdir()
    gateway = Gateway(registry, server, config, clock=clock.time)
    gateway.start()
    server.connect()
    try:
        device = broker.client("dev-1")
        device.connect()
        label_store.set_labels(registry, "dev-1", {"site": "berlin"})
        hostile = {
            "site": "claimed",
            "hw": "pi5",
            "bad key": "x",
            "os": "\x1b[2J",
            "x" * 400: "y",
            **{f"k{i:02d}": "v" for i in range(40)},
        }
        device.publish(T.device_reported("dev-1"), _reported(hostile), 1, True)

        def stored() -> bool:
            broker.pump()
            return gateway.stats().reported_stored == 1

        assert broker.pump_until(stored, WAIT)
        got = label_store.device_labels(registry, "dev-1")
        assert got.device["hw"] == "pi5"
        assert len(got.device) == 32  # bounded; the rest counted
        assert got.refused == 3 + (42 - 32)
        assert gateway.stats().reported_labels_refused == got.refused
        assert got.effective["site"] == "berlin"  # the operator's label wins
        rep = registry.get_device("dev-1").reported or {}
        assert rep["models"]["digits"]["active"] == 1  # the document itself was stored
        assert "bad key" not in rep["labels"]
    finally:
        gateway.close()
        server.close()
