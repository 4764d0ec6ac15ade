"""fleet_server.gateway.gateway against a real Mosquitto (TLS, client certificates, fleet ACLs).

Devices are plain ``MqttClient``s with their own certificates; the gateway runs with the
server identity over a shared subscription. Every check is made on what a device actually
receives or what the registry actually stored. ``dev-c`` has a broker certificate but is not
enrolled in the registry (the "unknown device").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from clock import FakeClock
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import Message, MqttConfig
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    Batch,
    Event,
    StatusMessage,
    TelemetryAck,
    TelemetryReport,
)
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockPlan, BlockRequest
from edge_agent.wire.transfer_progress import Progress
from fleet_server.config import GatewayConfig
from fleet_server.delivery.desired import make_desired_state
from fleet_server.gateway.gateway import Gateway
from fleet_server.registry.store import Registry
from mosquitto import FleetBroker, broker_fixture
from support import wait_until

# ``probe.server``: a second server identity for observers and a second gateway (with
# use_username_as_clientid, two sessions of one identity would take each other over).
broker = broker_fixture(
    scope="module", devices=("dev-a", "dev-b", "dev-c"), workers=("probe.server",)
)
# Deadlines for things that do happen (absence is shown with fences, never by waiting): long
# enough for a machine under heavy load (a fresh-machine run beside other jobs missed 10 s).
WAIT = 30.0
_ids = itertools.count()


def client_config(b: FleetBroker, identity: str, **overrides: Any) -> MqttConfig:
    creds = b.creds[identity]
    values: dict[str, Any] = {
        "host": b.host,
        "port": b.port,
        "device_id": identity,
        "ca_path": creds.ca,
        "cert_path": creds.cert,
        "key_path": creds.key,
        "prefix": b.prefix,
        "reconnect_min": 0.1,
        "reconnect_max": 0.5,
    }
    values.update(overrides)
    return MqttConfig(**values)


class Device:
    """A device-side client collecting what arrives on the topics it subscribed."""

    def __init__(self, b: FleetBroker, name: str) -> None:
        self.name = name
        self.topics = Topics(b.prefix)
        self.client = MqttClient(client_config(b, name))
        self.received: queue.Queue[Message] = queue.Queue()
        self.client.connect()
        self.client.wait_connected(WAIT)

    def subscribe(self, topic: str, handler: Callable[[Message], None] | None = None) -> None:
        self.client.subscribe(topic, handler or self.received.put)

    def publish(self, kind: str, payload: bytes) -> None:
        handle = self.client.publish(self.topics.device(kind, self.name), payload)
        self.client.wait_published(handle, WAIT)

    def next_ack(self, timeout: float = WAIT) -> TelemetryAck:
        return TelemetryAck.from_bytes(self.received.get(timeout=timeout).payload)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def env(broker: FleetBroker, tmp_path: Path) -> Iterator[dict[str, Any]]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    registry.enroll("dev-a")
    registry.enroll("dev-b")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    server = MqttClient(
        client_config(
            broker,
            broker.server,
            device_id=f"{broker.server}-{next(_ids)}-{os.getpid()}",
            announce_status=False,
            clean_start=False,
            session_expiry=60,
            inbox_size=50_000,
        )
    )
    config = GatewayConfig(prefix=broker.prefix, bundles_dir=bundles, resend_round_seconds=0.3)
    gateway = Gateway(registry, server, config)
    # As the server does: connected first, so ``start`` returns once every SUBACK is in
    # (subscribing before the connection is the memory-transport tests' case).
    server.connect()
    server.wait_connected(WAIT)
    gateway.start()
    devices: list[Device] = []

    def device(name: str) -> Device:
        d = Device(broker, name)
        devices.append(d)
        return d

    yield {
        "registry": registry,
        "gateway": gateway,
        "server": server,
        "device": device,
        "bundles": bundles,
    }
    for d in devices:
        d.close()
    gateway.close()
    server.close()
    registry.close()


def report(device: str, seq: int) -> TelemetryReport:
    return TelemetryReport(device_id=device, seq=seq, window_start=0.0, window_end=60.0)


def event(device: str, seq: int) -> Event:
    return Event(device_id=device, seq=seq, kind="installed", at=61.0, model="m", version=1)


# --------------------------------------------------------------------------- telemetry
def test_batches_are_stored_and_acked_and_garbage_is_counted_not_acked(
    env: dict[str, Any],
) -> None:
    registry: Registry = env["registry"]
    gateway: Gateway = env["gateway"]
    a, c = env["device"]("dev-a"), env["device"]("dev-c")
    topics = Topics("edgefleet")
    a.subscribe(topics.device_ack("dev-a"))
    c.subscribe(topics.device_ack("dev-c"))

    ev = event("dev-a", 3)
    a.publish("telemetry", Batch("dev-a", (report("dev-a", 1), report("dev-a", 2), ev)).to_bytes())
    a.publish("events", ev.to_bytes())  # the same event alone: idempotent
    acks = [a.next_ack(), a.next_ack()]
    assert [x.upto_seq for x in acks] == [3, 3]
    assert all(x.device_id == "dev-a" for x in acks)
    assert [r.seq for r in registry.telemetry(device_id="dev-a")] == [1, 2, 3]
    assert registry.seq_state("dev-a").acked_upto == 3

    # A device that lost its ack resends: the duplicate is acked again, not stored twice.
    a.publish("telemetry", Batch("dev-a", (report("dev-a", 2),)).to_bytes())
    assert a.next_ack().upto_seq == 3

    # Garbage of every kind, then a valid batch: only the valid one is acked.
    a.publish("telemetry", b"{not json")
    a.publish("telemetry", b"x" * (MAX_PAYLOAD_BYTES + 1))
    a.publish("telemetry", Batch("dev-b", (report("dev-b", 4),)).to_bytes())  # foreign id
    wrong_schema = (
        Batch("dev-a", (report("dev-a", 4),))
        .to_bytes()
        .replace(b'"schema_version":1', b'"schema_version":99')
    )
    a.publish("telemetry", wrong_schema)
    a.publish("events", report("dev-a", 4).to_bytes())  # a report on the events topic
    c.publish("telemetry", Batch("dev-c", (report("dev-c", 1),)).to_bytes())  # not enrolled
    a.publish("telemetry", Batch("dev-a", (report("dev-a", 4),), floor=2).to_bytes())
    assert a.next_ack().upto_seq == 4
    # Every message handled (the unknown device's is refused by the ingest), the ingest idle:
    # no ack can be on its way any more. Acks are published in order, so a fence published
    # now by the gateway's client is the next message each device gets unless one was acked.
    refusals = {"malformed": 2, "oversized": 1, "device_mismatch": 1}
    refusals |= {"wrong_type": 1, "unknown_device": 1}
    wait_until(
        lambda: refusals.items() <= gateway.stats().rejected.items(),
        what=lambda: f"refusals {refusals}, counted {gateway.stats().rejected}",
    )
    assert gateway.drain(WAIT)
    server: MqttClient = env["server"]
    for device in ("dev-a", "dev-c"):
        server.publish(topics.device_ack(device), b"fence")  # QoS 0, like the acks
    assert a.received.get(timeout=WAIT).payload == b"fence", "a rejected message was acked"
    assert c.received.get(timeout=WAIT).payload == b"fence", "the unknown device was acked"
    assert [r.seq for r in registry.telemetry(device_id="dev-a")] == [1, 2, 3, 4]

    stats = gateway.stats()
    assert stats.rejected["malformed"] == 2
    assert stats.rejected["oversized"] == 1
    assert stats.rejected["device_mismatch"] == 1
    assert stats.rejected["wrong_type"] == 1
    assert stats.rejected["unknown_device"] == 1
    assert (stats.items_inserted, stats.acks_sent) == (4, 4)
    assert stats.duplicates == 2  # the lone event and the resent report
    assert stats.messages["telemetry"] == 8
    assert stats.messages["events"] == 2


def test_many_devices_messages_are_batched_in_order(env: dict[str, Any]) -> None:
    registry: Registry = env["registry"]
    a, b = env["device"]("dev-a"), env["device"]("dev-b")
    acks: dict[str, list[int]] = {"dev-a": [], "dev-b": []}
    done = threading.Event()

    def collect(m: Message) -> None:
        ack = TelemetryAck.from_bytes(m.payload)
        acks[ack.device_id].append(ack.upto_seq)
        if all(v and v[-1] == 200 for v in acks.values()):
            done.set()

    a.subscribe("edgefleet/devices/dev-a/ack", collect)
    b.subscribe("edgefleet/devices/dev-b/ack", collect)
    for seq in range(1, 201):  # queued without waiting: many land in one transaction
        for d in (a, b):
            d.client.publish(
                d.topics.device_telemetry(d.name),
                Batch(d.name, (report(d.name, seq),)).to_bytes(),
            )
    assert done.wait(WAIT * 2), acks
    for name in ("dev-a", "dev-b"):
        # In order: every ack moves the mark by exactly one.
        assert acks[name] == list(range(1, 201))
        assert registry.seq_state(name).acked_upto == 200
    assert env["gateway"].stats().items_inserted == 400


# --------------------------------------------------------------------------- state
def test_reported_state_lands_in_the_registry_and_status_is_tracked(
    env: dict[str, Any],
) -> None:
    registry: Registry = env["registry"]
    gateway: Gateway = env["gateway"]
    a = env["device"]("dev-a")
    state = ReportedState(
        device_id="dev-a",
        at=123.0,
        agent_version="0.1.0",
        desired_version=4,
        models={"digits": ModelReport(active=3, kept=(2,), assigned=3, outcome="installed")},
    )
    a.publish("reported", state.to_bytes())
    wait_until(lambda: registry.get_device("dev-a").reported is not None, what="reported")
    assert registry.get_device("dev-a").reported == state.to_dict()
    # Another device's id in the payload is refused and stores nothing.
    forged = ReportedState(device_id="dev-b", at=1.0)
    a.publish("reported", forged.to_bytes())
    wait_until(lambda: gateway.stats().rejected.get("device_mismatch") == 1, what="mismatch")
    assert registry.get_device("dev-b").reported is None
    assert gateway.stats().reported_stored == 1

    wait_until(lambda: "dev-a" in gateway.online(), what="status of dev-a")
    assert gateway.online()["dev-a"].state == "online"
    assert gateway.stats().devices_online >= 1
    a.close()
    wait_until(lambda: gateway.online()["dev-a"].state == "offline", what="offline")


# --------------------------------------------------------------------------- blocks
def _publish_bundle(
    env: dict[str, Any], size: int, assign_to: tuple[str, ...] = ("dev-a", "dev-b")
) -> tuple[bytes, str]:
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    (env["bundles"] / f"{sha}.bundle").write_bytes(data)
    env["registry"].publish_bundle(
        "demo", size, channel="stable", sha256=sha, length=size, targets_sha256="c" * 64
    )
    for device_id in assign_to:
        _assign(env["registry"], device_id, sha, size)
    return data, sha


def _assign(registry: Registry, device_id: str, sha: str, size: int) -> None:
    """Store a desired state naming the bundle (the gateway serves only assigned bundles)."""
    assignment = ModelAssignment(
        version=size,
        channel="stable",
        bundle_sha256=sha,
        bundle_length=size,
        targets_sha256="c" * 64,
    )

    def build(version: int) -> bytes:
        state = make_desired_state(
            device_id, version, {"demo": assignment}, datetime.now(UTC).replace(microsecond=0)
        )
        return json.dumps({"signed": state.to_dict(), "signatures": []}).encode()

    registry.assign_desired(device_id, build)


class Receiver:
    """Reassembles one transfer from unicast and broadcast blocks."""

    def __init__(self, device: Device, plan: BlockPlan) -> None:
        self.device = device
        self.plan = plan
        self.progress = Progress(plan)
        self.blocks: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.complete = threading.Event()
        self.sources: dict[str, int] = {"unicast": 0, "broadcast": 0}
        device.subscribe(device.topics.blocks_resp(device.name), self._on("unicast"))
        device.subscribe("edgefleet/broadcast/+", self._on("broadcast"))

    def _on(self, source: str) -> Callable[[Message], None]:
        def handle(m: Message) -> None:
            block = BlockData.from_bytes(m.payload)
            if block.transfer_id != self.plan.transfer_id:
                return
            block.check(self.plan)
            with self.lock:
                self.sources[source] += 1
                if self.progress.accept(block.index, len(block.payload)):
                    self.blocks[block.index] = block.payload
                if self.progress.complete:
                    self.complete.set()

        return handle

    def request(self) -> None:
        req = self.progress.request()
        assert req is not None
        self.device.publish("blocks_req", req.to_bytes())

    def data(self) -> bytes:
        return b"".join(self.blocks[i] for i in range(self.plan.n_blocks))


def test_blocks_are_served_unicast_and_reassembled_byte_exact(env: dict[str, Any]) -> None:
    data, sha = _publish_bundle(env, 5 * 65536 + 1234)
    plan = BlockPlan(len(data), sha)
    a = env["device"]("dev-a")
    rx = Receiver(a, plan)
    rx.request()
    assert rx.complete.wait(WAIT)
    assert rx.data() == data
    assert rx.sources["broadcast"] == 0
    stats = env["gateway"].stats()
    assert (stats.blocks_unicast, stats.blocks_broadcast) == (plan.n_blocks, 0)

    # An unknown transfer and out-of-range blocks are counted and dropped.
    a.publish("blocks_req", BlockRequest("0" * 32, ((0, 1),)).to_bytes())
    a.publish("blocks_req", BlockRequest(plan.transfer_id, ((0, plan.n_blocks + 5),)).to_bytes())
    a.publish("blocks_req", b"\x00\x05junk!")
    wait_until(lambda: env["gateway"].stats().rejected.get("out_of_range") == 1, what="range")
    stats = env["gateway"].stats()
    assert stats.rejected["unknown_transfer"] == 1
    assert stats.rejected["malformed"] == 1
    assert stats.blocks_unicast == plan.n_blocks


def test_a_device_cannot_fetch_a_bundle_its_desired_state_does_not_name(
    env: dict[str, Any],
) -> None:
    """Knowing a published bundle's digest and length is not enough: dev-b is not assigned it,
    so it gets no block (unicast or broadcast) and the refusal is counted against dev-b.
    dev-a, which is assigned it, still gets every block."""
    gateway: Gateway = env["gateway"]
    data, sha = _publish_bundle(env, 2 * 65536 + 3, assign_to=("dev-a",))
    plan = BlockPlan(len(data), sha)
    b = env["device"]("dev-b")
    foreign = Receiver(b, plan)
    foreign.request()
    wait_until(lambda: gateway.stats().rejected.get("foreign_bundle") == 1, what="refusal")
    rx = Receiver(env["device"]("dev-a"), plan)
    rx.request()
    assert rx.complete.wait(WAIT)
    assert rx.data() == data
    foreign.request()  # asking again does not help
    wait_until(lambda: gateway.stats().rejected.get("foreign_bundle") == 2, what="refusal")
    assert foreign.sources == {"unicast": 0, "broadcast": 0}
    [mis] = gateway.misbehaviour("dev-b")
    assert mis.reasons == {"foreign_bundle": 2}
    assert gateway.misbehaviour("dev-a")[0].total == 0
    # Once its desired state names the bundle, dev-b is served like any assigned device.
    _assign(env["registry"], "dev-b", sha, len(data))
    gateway.publish_desired("dev-b", b"{}")  # what the service does after storing it
    foreign.request()
    assert foreign.complete.wait(WAIT)
    assert foreign.data() == data


def test_blocks_two_devices_want_are_broadcast_once(env: dict[str, Any]) -> None:
    data, sha = _publish_bundle(env, 4 * 65536)
    plan = BlockPlan(len(data), sha)
    rx_a = Receiver(env["device"]("dev-a"), plan)
    rx_b = Receiver(env["device"]("dev-b"), plan)
    rx_a.request()
    rx_b.request()  # within the same 0.3 s round
    assert rx_a.complete.wait(WAIT)
    assert rx_b.complete.wait(WAIT)
    assert rx_a.data() == data
    assert rx_b.data() == data
    stats = env["gateway"].stats()
    assert stats.blocks_broadcast == plan.n_blocks
    assert stats.blocks_unicast == 0
    assert rx_a.sources["broadcast"] == plan.n_blocks


def test_wave_broadcasts_every_block_and_gaps_are_repaired(env: dict[str, Any]) -> None:
    data, sha = _publish_bundle(env, 3 * 65536 + 7)
    plan = BlockPlan(len(data), sha)
    rx = Receiver(env["device"]("dev-b"), plan)  # subscribed (SUBACKs in) before the wave
    wave = env["gateway"].start_wave(sha)
    assert wave == plan.transfer_id
    assert rx.complete.wait(WAIT)
    assert rx.data() == data
    assert rx.sources == {"unicast": 0, "broadcast": plan.n_blocks}
    # A device that joined late repairs everything by request.
    late = Receiver(env["device"]("dev-a"), plan)
    late.request()
    assert late.complete.wait(WAIT)
    assert late.data() == data


# --------------------------------------------------------------------------- desired
def test_desired_is_retained_and_republished_after_a_broker_restart(
    broker: FleetBroker, env: dict[str, Any]
) -> None:
    registry: Registry = env["registry"]
    gateway: Gateway = env["gateway"]
    server: MqttClient = env["server"]
    registry.assign_desired("dev-b", lambda v: b"signed-desired-v%d" % v)
    registry.assign_desired("dev-b", lambda v: b"signed-desired-v%d" % v)
    # Retained: a device that subscribes after the publish still gets the document.
    gateway.publish_desired("dev-a", b"doc-for-a")
    a = env["device"]("dev-a")
    a.subscribe(a.topics.device_desired("dev-a"))
    assert a.received.get(timeout=WAIT).payload == b"doc-for-a"
    # A gateway whose session connects (here: before ``start``) republishes every device's
    # latest stored document. dev-b listens first: this module's broker may still hold what an
    # earlier test left retained on its topic, so the test waits for the republished document
    # instead of trusting the first retained message to be it.
    b = env["device"]("dev-b")
    b.subscribe(b.topics.device_desired("dev-b"))
    server2 = MqttClient(
        client_config(
            broker, broker.server, device_id=f"{broker.server}-x{next(_ids)}", announce_status=False
        )
    )
    server2.connect()
    server2.wait_connected(WAIT)
    gateway2 = Gateway(registry, server2, GatewayConfig(share_group="other"))
    gateway2.start()
    try:
        wait_until(lambda: gateway2.stats().desired_published == 1, what="first republish")
        seen: list[bytes] = []
        while b"signed-desired-v2" not in seen:  # queue.Empty after WAIT fails the test
            seen.append(b.received.get(timeout=WAIT).payload)
    finally:
        gateway2.close()
        server2.close()

    b.close()  # the fresh client below must not resume this session's queued messages
    connects = server.stats().connects
    published = gateway.stats().desired_published
    broker.kill()  # no persistence: every retained message is gone
    broker.start()
    wait_until(lambda: server.stats().connects > connects, what="gateway reconnect")
    wait_until(lambda: gateway.stats().desired_published > published, what="republish")
    fresh = Device(broker, "dev-b")
    try:
        fresh.subscribe(fresh.topics.device_desired("dev-b"))
        msg = fresh.received.get(timeout=WAIT)
        assert (msg.payload, msg.retain) == (b"signed-desired-v2", True)
    finally:
        fresh.close()


def test_a_device_over_its_message_rate_is_refused_not_acked(
    broker: FleetBroker, tmp_path: Path
) -> None:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    registry.enroll("dev-a")
    registry.enroll("dev-b")
    server = MqttClient(
        client_config(
            broker,
            broker.server,
            device_id=f"{broker.server}-{next(_ids)}-{os.getpid()}",
            announce_status=False,
            clean_start=False,
            session_expiry=60,
        )
    )
    config = GatewayConfig(
        prefix=broker.prefix, bundles_dir=tmp_path, device_rate_per_second=0.5, device_burst=3
    )
    clock = FakeClock()  # the rate limit's: no token comes back unless the test moves it
    gateway = Gateway(registry, server, config, rate_clock=clock)
    server.connect()
    server.wait_connected(WAIT)
    gateway.start()  # connected: returns with every subscription acknowledged
    a, b = Device(broker, "dev-a"), Device(broker, "dev-b")
    try:
        a.subscribe(Topics("edgefleet").device_ack("dev-a"))
        b.subscribe(Topics("edgefleet").device_ack("dev-b"))
        for seq in range(1, 9):  # a flood: 8 messages at once, 3 allowed
            a.publish("telemetry", Batch("dev-a", (report("dev-a", seq),)).to_bytes())
        b.publish("telemetry", Batch("dev-b", (report("dev-b", 1),)).to_bytes())
        # Acks are cumulative and QoS 0: one may repeat (harmless), none may go past the 3 allowed.
        acked = [a.next_ack().upto_seq]
        while acked[-1] < 3:
            acked.append(a.next_ack().upto_seq)
        assert acked == sorted(acked), acked
        assert acked[-1] == 3, acked
        assert b.next_ack().upto_seq == 1  # another device is not held back
        wait_until(lambda: gateway.stats().rejected.get("rate_limited") == 5, what="refusals")
        assert gateway.drain(WAIT)  # every ack there will be is published: a fence is last
        server.publish(Topics("edgefleet").device_ack("dev-a"), b"fence")
        late = []
        while (m := a.received.get(timeout=WAIT)).payload != b"fence":
            late.append(TelemetryAck.from_bytes(m.payload).upto_seq)
        assert all(s <= 3 for s in late), f"a refused message was acked: {late}"
        assert [r.seq for r in registry.telemetry(device_id="dev-a")] == [1, 2, 3]
        clock.advance(2.1)  # one token back: the device's resend gets through
        a.publish("telemetry", Batch("dev-a", (report("dev-a", 4),)).to_bytes())
        assert a.next_ack().upto_seq == 4
    finally:
        a.close()
        b.close()
        gateway.close()
        server.close()
        registry.close()


# --------------------------------------------------------------------------- presence
def _gateway(broker: FleetBroker, registry: Registry, tmp_path: Path, **kw: Any) -> Gateway:
    server = MqttClient(
        client_config(broker, "probe.server", announce_status=False, clean_start=True)
    )
    gateway = Gateway(
        registry, server, GatewayConfig(prefix=broker.prefix, bundles_dir=tmp_path, **kw)
    )
    gateway.start()
    server.connect()
    server.wait_connected(WAIT)
    gateway._test_client = server  # type: ignore[attr-defined]
    return gateway


def _close(gateway: Gateway) -> None:
    gateway.close()
    gateway._test_client.close()  # type: ignore[attr-defined]


def test_a_retained_online_status_without_a_live_agent_is_not_online(
    broker: FleetBroker, tmp_path: Path
) -> None:
    """A device leaves ``online`` retained and goes silent (no will, clean disconnect): the
    gateway does not believe it past the presence timeout, and a server that starts afterwards
    never shows it online from the retained message alone."""
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = _gateway(broker, registry, tmp_path, presence_timeout_seconds=1.0)
    liar = MqttClient(client_config(broker, "dev-b", announce_status=False))
    liar.connect()
    liar.wait_connected(WAIT)
    try:
        status = StatusMessage("dev-b", "online", time.time())
        liar.wait_published(
            liar.publish(Topics("edgefleet").device_status("dev-b"), status.to_bytes(), 1, True),
            WAIT,
        )
        # Online, not merely known: this module's broker may still hold an earlier test's
        # retained "offline" (shutdown) for dev-b, which the gateway reads first.
        wait_until(
            lambda: getattr(gateway.online().get("dev-b"), "state", None) == "online",
            what="dev-b online",
        )
        liar.close()  # a clean disconnect: no will, the retained "online" stays
        wait_until(lambda: gateway.online()["dev-b"].state == "offline", what="presence timeout")
        assert gateway.online()["dev-b"].reason == "connection_lost"
    finally:
        _close(gateway)
    restarted = _gateway(broker, registry, tmp_path / "r")
    try:
        wait_until(lambda: "dev-b" in restarted.online(), what="retained status replayed")
        assert restarted.online()["dev-b"].state == "offline"
        assert restarted.stats().devices_online == 0
    finally:
        _close(restarted)
        registry.close()


def test_retained_garbage_on_a_status_topic_is_refused_counted_and_cleared(
    broker: FleetBroker, env: dict[str, Any]
) -> None:
    gateway: Gateway = env["gateway"]
    a = env["device"]("dev-a")
    topics = Topics("edgefleet")
    a.client.wait_published(
        a.client.publish(topics.device_status("dev-a"), b"\x00junk" * 20_000, 1, True), WAIT
    )
    wait_until(lambda: gateway.stats().retained_cleared >= 1, what="garbage cleared")
    assert gateway.stats().rejected["oversized"] >= 1
    assert gateway.misbehaviour("dev-a")[0].reasons.get("oversized", 0) >= 1
    # A consumer that subscribes now gets no retained garbage: only what comes after it.
    probe = MqttClient(client_config(broker, "probe.server", announce_status=False))
    got: queue.Queue[Message] = queue.Queue()
    probe.connect()
    probe.wait_connected(WAIT)
    try:
        # The broker handles one client's publishes in order: once the gateway's next publish
        # reached the probe, its clearing of the retained garbage was handled too.
        fence: queue.Queue[Message] = queue.Queue()
        probe.subscribe(topics.device_ack("dev-c"), fence.put)
        env["server"].publish(topics.device_ack("dev-c"), b"fence", 1)
        assert fence.get(timeout=WAIT).payload == b"fence"
        probe.subscribe(topics.device_status("dev-a"), got.put)
        marker = StatusMessage("dev-a", "offline", 1.0, "shutdown").to_bytes()
        a.publish("status", marker)  # positive control on the same subscription
        while (m := got.get(timeout=WAIT)).payload != marker:
            StatusMessage.from_bytes(m.payload)  # a real status (an earlier one), not garbage
    finally:
        probe.close()
