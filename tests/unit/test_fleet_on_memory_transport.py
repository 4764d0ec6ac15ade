"""Sync, ingest and block delivery on the in-memory transport: no sockets, no sleeps.

The same production objects the real-Mosquitto tests run (``SyncAgent``, ``Gateway``,
``BlockServer``) over ``edge_agent.common.memory``, driven step by step with a
``FakeClock``: the device loop runs without its thread (``start(background=False)`` and
``step``), messages move only when the test calls ``pump``. The gateway's ingest runs on its
own thread (its only way to store); there the test waits on the broker's condition, with a
deadline, until the acknowledgement comes (``MemoryBroker(blocking=True)``), never on a timer.
What only a real broker shows (TLS, ACLs, reconnect backoff, kills) stays in
``tests/integration``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clock import FakeClock
from edge_agent.common.memory import MemoryBroker, MemoryClient
from edge_agent.common.mqtt_types import Message
from edge_agent.config import AgentConfig, StoreConfig, SyncConfig
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from edge_agent.sync.loop import SyncAgent
from edge_agent.trust import TrustedRoot
from edge_agent.wire.reported import ReportedState
from edge_agent.wire.telemetry import Batch, Event, StatusMessage, TelemetryAck, TelemetryReport
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockPlan, BlockRequest
from fleet_server.config import GatewayConfig
from fleet_server.delivery.block_server import BlockServer, Pacer
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry.store import Registry
from model_builder.keystore import KeyStore
from support import DEVICE

T = Topics()
WAIT = 10.0  # deadline for the ingest thread's acknowledgement (normally milliseconds)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    r.upgrade()
    for device in ("dev-1", "dev-2"):
        r.enroll(device, group="test")
    yield r
    r.close()


def _device(
    tmp_path: Path, keys: KeyStore, broker: MemoryBroker, clock: FakeClock
) -> tuple[SyncAgent, Agent, MemoryClient]:
    state = tmp_path / "dev-1"
    config = AgentConfig(
        device_id="dev-1", store=StoreConfig(state_dir=str(state)), sync=SyncConfig(enabled=True)
    )
    store = ModelStore(state, TrustedRoot.from_bytes(keys.root_chain()[0]), DEVICE)
    agent = Agent(config, store)
    client = broker.client("dev-1", announce_status=True, clock=clock.time)
    return SyncAgent(config, agent, client=client, clock=clock.time), agent, client


def _desired(keys: KeyStore, version: int) -> bytes:
    state = make_desired_state("dev-1", version, {}, datetime.now(UTC), timedelta(hours=1))
    return sign_desired_state(state, [keys.signer("online-1")])


# --------------------------------------------------------------------------- device sync loop
def test_device_accepts_retained_desired_state_reports_and_reports_again_after_reconnect(
    tmp_path: Path, keys: KeyStore, clock: FakeClock
) -> None:
    broker = MemoryBroker(clock=clock)
    server = broker.client("fleet.server")
    server.connect()
    reported, status = Inbox(), Inbox()
    server.subscribe(T.all_devices("reported"), reported)
    server.subscribe(T.all_devices("status"), status)
    server.publish(T.device_desired("dev-1"), _desired(keys, 1), 1, True)  # before the device

    sync, agent, client = _device(tmp_path, keys, broker, clock)
    try:
        sync.start(background=False)
        assert broker.subscriptions("dev-1") == {s.filter: 1 for s in T.sync_subscriptions("dev-1")}
        broker.pump()  # the retained desired state reaches the device's handler
        sync.step()  # the loop verifies, persists and applies it, then reports
        broker.pump()
        assert sync.counts["desired_accepted"] == 1
        assert [StatusMessage.from_bytes(m.payload).state for m in status.messages] == ["online"]
        [first] = [ReportedState.from_bytes(m.payload) for m in reported.messages]
        assert first.device_id == "dev-1"
        assert first.desired_version == 1
        assert reported.messages[0].retain is False  # a live copy

        sync.step()  # nothing changed: nothing is published again
        broker.pump()
        assert len(reported.messages) == 1

        # The connection breaks: the broker publishes the will; after the reconnect the retained
        # desired state comes again (ignored, not accepted twice) and the device reports again
        # (the broker may have lost the retained copy).
        client.drop()
        broker.pump()
        assert StatusMessage.from_bytes(status.messages[-1].payload).reason == "connection_lost"
        client.reconnect()
        broker.pump()
        sync.step()
        broker.pump()
        assert sync.counts["desired_accepted"] == 1
        assert sync.counts["desired_rejected"] == 0
        assert len(reported.messages) == 2
        assert ReportedState.from_bytes(reported.messages[1].payload).desired_version == 1

        # A newer document is accepted; a replay of the older one is refused and counted.
        server.publish(T.device_desired("dev-1"), _desired(keys, 2), 1, True)
        broker.pump()
        sync.step()
        server.publish(T.device_desired("dev-1"), _desired(keys, 1), 1, True)
        broker.pump()
        sync.step()
        assert sync.counts["desired_accepted"] == 2
        assert sync.counts["desired_rejected"] == 1
        assert sync.status()["desired_version"] == 2
    finally:
        sync.close()
        agent.close()
    last = broker.retained(T.device_status("dev-1"))
    assert last is not None
    assert StatusMessage.from_bytes(last.payload).reason == "shutdown"


# --------------------------------------------------------------------------- gateway ingest
def _gateway(
    registry: Registry, broker: MemoryBroker, tmp_path: Path, clock: FakeClock
) -> tuple[Gateway, MemoryClient]:
    client = broker.client("fleet.server")
    config = GatewayConfig(bundles_dir=tmp_path / "bundles", ingest_max_wait_seconds=0.0)
    config.bundles_dir.mkdir(exist_ok=True)
    gateway = Gateway(registry, client, config, clock=clock.time)
    gateway.start()
    client.connect()
    return gateway, client


def _report(seq: int) -> TelemetryReport:
    return TelemetryReport(device_id="dev-2", seq=seq, window_start=0.0, window_end=1.0)


def test_gateway_ingests_a_batch_acks_it_and_refuses_a_forged_one(
    tmp_path: Path, registry: Registry, clock: FakeClock
) -> None:
    broker = MemoryBroker(clock=clock, blocking=True)
    gateway, server = _gateway(registry, broker, tmp_path, clock)
    try:
        assert broker.subscriptions("fleet.server") == {
            s.filter: 1 for s in T.gateway_subscriptions("fleet")
        }
        device = broker.client("dev-2")
        acks = Inbox()
        device.subscribe(T.device_ack("dev-2"), acks)
        device.connect()
        batch = Batch(
            "dev-2",
            (_report(1), Event("dev-2", 2, "installed", 1.0), _report(3)),
        )
        device.publish(T.device_telemetry("dev-2"), batch.to_bytes())
        assert broker.pump_until(lambda: bool(acks.messages), WAIT), "no ack"
        ack = TelemetryAck.from_bytes(acks.messages[0].payload)
        assert ack.upto_seq == 3
        assert acks.messages[0].qos == 0  # acks go out at QoS 0 by design
        stored = registry.telemetry(device_id="dev-2", limit=10)
        assert sorted(t.kind for t in stored) == ["event", "report", "report"]

        # The same batch again (a lost ack): acknowledged again, stored once.
        device.publish(T.device_telemetry("dev-2"), batch.to_bytes())
        assert broker.pump_until(lambda: len(acks.messages) == 2, WAIT), "no second ack"
        assert len(registry.telemetry(device_id="dev-2", limit=10)) == 3

        # A batch in dev-2's topic that claims to be dev-1's is refused and never acked.
        forged = Batch("dev-1", (TelemetryReport("dev-1", 9, 0.0, 1.0),))
        device.publish(T.device_telemetry("dev-2"), forged.to_bytes())
        broker.pump()
        stats = gateway.stats()
        assert sum(stats.rejected.values()) == 1
        assert stats.items_inserted == 3
        assert stats.duplicates == 3
        assert registry.telemetry(device_id="dev-1", limit=10) == []
    finally:
        gateway.close()
        server.close()


def test_device_telemetry_is_acknowledged_end_to_end(
    tmp_path: Path, keys: KeyStore, registry: Registry, clock: FakeClock
) -> None:
    broker = MemoryBroker(clock=clock, blocking=True)
    gateway, server = _gateway(registry, broker, tmp_path, clock)
    sync, agent, _client = _device(tmp_path, keys, broker, clock)
    try:
        sync.start(background=False)
        sync.uplink.add_event(Event("dev-1", 0, "installed", clock.time(), model="m", version=1))
        sync.step()  # the uplink publishes one batch
        assert sync.outbox.stats().entries >= 1
        assert broker.pump_until(lambda: sync.outbox.stats().entries == 0, WAIT), "not acked"
        assert sync.uplink.stats().acks == 1
        [event] = registry.telemetry(device_id="dev-1", limit=10, kind="event")
        assert event.payload["kind"] == "installed"
        assert registry.seq_state("dev-1").acked_upto >= 1
        assert gateway.online()["dev-1"].state == "online"
    finally:
        sync.close()
        agent.close()
        gateway.close()
        server.close()


# --------------------------------------------------------------------------- block delivery
def test_a_block_round_broadcasts_shared_blocks_and_unicasts_the_rest(
    tmp_path: Path, registry: Registry, clock: FakeClock
) -> None:
    data = bytes(range(256)) * 1024 + b"tail"  # 4 blocks of 64 KiB and a short one
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{sha}.bundle").write_bytes(data)
    registry.publish_bundle(
        "m", 1, channel="stable", sha256=sha, length=len(data), targets_sha256="0" * 64
    )
    plan = BlockPlan(len(data), sha, 65536)
    broker = MemoryBroker(clock=clock)
    server = broker.client("fleet.server")
    server.connect()
    counts: Counter[str] = Counter()
    blocks = BlockServer(
        registry,
        server,
        T,
        bundles_dir=tmp_path,
        block_size=65536,
        broadcast_min_devices=2,
        round_seconds=0.1,
        pacer=Pacer(1000.0, monotonic=clock, sleep=clock.advance),
        count=lambda name, n: counts.update({name: n}),
        monotonic=clock,
    )
    got: dict[str, list[tuple[str, BlockData]]] = {"dev-1": [], "dev-2": []}
    for device_id in got:
        c = broker.client(device_id)
        for sub in T.sync_subscriptions(device_id):
            if sub.kind in ("blocks_resp", "broadcast"):
                c.subscribe(
                    sub.filter,
                    lambda m, d=device_id: got[d].append(  # type: ignore[misc]
                        (m.topic, BlockData.from_bytes(m.payload))
                    ),
                )
        c.connect()
    requests = [
        ("dev-1", BlockRequest(plan.transfer_id, ((0, 2), (4, 5)))),
        ("dev-2", BlockRequest(plan.transfer_id, ((0, 2),))),
    ]
    executed = blocks.serve_round(requests)
    broker.pump()
    blocks.close()
    assert executed.unknown == 0
    assert counts["blocks_broadcast"] == 2  # blocks 0 and 1: wanted by two devices
    assert counts["blocks_unicast"] == 1  # block 4: dev-1 alone
    for device_id, wanted in (("dev-1", [0, 1, 4]), ("dev-2", [0, 1])):
        received = sorted(got[device_id], key=lambda tb: tb[1].index)
        assert [b.index for _t, b in received] == wanted
        for topic, block in received:
            start, stop = plan.block_range(block.index)
            assert block.payload == data[start:stop]
            block.check(plan)
            unicast = topic == T.blocks_resp(device_id)
            assert unicast == (block.index == 4)
    # Within the hold time the same requests do not broadcast the same blocks again: the
    # requesters' copies are already on their way.
    blocks.serve_round(requests)
    assert counts["blocks_broadcast"] == 2
    assert counts["blocks_suppressed"] == 2
