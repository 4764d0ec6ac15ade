"""The packed encoding negotiated end to end: a device's sync loop and the real gateway over the
in-memory broker (no sockets, no sleeps; the ingest thread is waited for on the broker).

The device starts in JSON; the gateway's ack lists ``packed-1``; the device's next batch goes
packed, and the gateway stores it and acknowledges it like JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clock import FakeClock
from edge_agent.common.memory import MemoryBroker
from edge_agent.config import AgentConfig, StoreConfig, SyncConfig
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from edge_agent.sync.loop import SyncAgent
from edge_agent.trust import TrustedRoot
from edge_agent.wire.compact import is_packed
from edge_agent.wire.telemetry import TelemetryReport
from edge_agent.wire.topics import Topics
from fleet_server.config import GatewayConfig
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry.store import Registry
from model_builder.keystore import KeyStore
from support import DEVICE

WAIT = 10.0  # deadline for the ingest thread's acknowledgement (normally milliseconds)
FIXTURE = Path(__file__).parents[1] / "compat" / "telemetry-packed-v1-2026-12" / "batch.json"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    r.upgrade()
    r.enroll("dev-1", group="test")
    yield r
    r.close()


def _report_with_windows() -> TelemetryReport:
    report = json.loads(FIXTURE.read_bytes())["items"][0]
    return TelemetryReport.from_dict({**report, "device_id": "dev-1", "seq": 0})


@pytest.mark.parametrize("offered", [True, False])
def test_device_switches_to_packed_after_the_gateway_says_it_reads_it(
    tmp_path: Path, registry: Registry, offered: bool
) -> None:
    """``[gateway] packed_telemetry = false`` keeps every device on JSON (for consumers of the
    telemetry topics that read JSON only)."""
    clock = FakeClock()
    broker = MemoryBroker(clock=clock, blocking=True)
    server = broker.client("fleet.server")
    config = GatewayConfig(
        bundles_dir=tmp_path / "bundles", ingest_max_wait_seconds=0.0, packed_telemetry=offered
    )
    config.bundles_dir.mkdir()
    gateway = Gateway(registry, server, config, clock=clock.time)
    gateway.start()
    server.connect()
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    state = tmp_path / "dev-1"
    agent_config = AgentConfig(
        device_id="dev-1", store=StoreConfig(state_dir=str(state)), sync=SyncConfig(enabled=True)
    )
    store = ModelStore(state, TrustedRoot.from_bytes(keys.root_chain()[0]), DEVICE)
    agent = Agent(agent_config, store)
    client = broker.client("dev-1", announce_status=True, clock=clock.time)
    sync = SyncAgent(agent_config, agent, client=client, clock=clock.time)
    seen: list[bytes] = []
    tap = broker.client("tap")
    tap.subscribe(Topics().device_telemetry("dev-1"), lambda m: seen.append(m.payload))
    tap.connect()
    try:
        sync.start(background=False)
        sync.uplink.add_report(_report_with_windows())
        sync.step()
        assert broker.pump_until(lambda: sync.outbox.stats().entries == 0, WAIT), "not acked"
        sync.uplink.add_report(_report_with_windows())
        sync.step()
        assert broker.pump_until(lambda: sync.outbox.stats().entries == 0, WAIT), "not acked"
        assert [is_packed(p) for p in seen] == [False, offered]
        if offered:
            assert len(seen[1]) * 5 < len(seen[0])
        assert sync.uplink.stats().packed_sent == int(offered)
        stored = registry.telemetry(device_id="dev-1", limit=10, kind="report")
        assert len(stored) == 2
        assert stored[0].payload["models"] == stored[1].payload["models"]  # same information
        assert gateway.stats().rejected == {}
    finally:
        sync.close()
        agent.close()
        gateway.close()
        server.close()
        tap.close()
