"""The in-memory broker against real Mosquitto: the double must not drift from the real thing.

1. Topic matching: one real client subscribes to many filters, each with its own MQTT v5
   subscription identifier, so every delivered copy says which filters Mosquitto matched; that
   must equal ``topic_matches`` for every (filter, topic) pair, and the number of copies per
   topic must equal what ``MemoryBroker`` delivers (one per matching subscription).
2. The same shared-subscription and retained-message scenario, written once against
   ``Transport``, run on ``MqttClient`` + Mosquitto and on ``MemoryClient``: the same
   observations. It also pins down where Mosquitto 2.0 departs from MQTT 5: it sends a
   retained message to a new shared subscription (``MemoryBroker(retained_to_shared=True)``
   mirrors that; the default follows the specification).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.common.memory import MemoryBroker
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import Message, MqttConfig
from edge_agent.common.transport import Transport, topic_matches
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

WAIT = 10.0
WORKER = "w1.server"
READER = "w2.server"
SENTINEL = "edgefleet/zz/end"

FILTERS = (
    "#",
    "+/a/b",
    "edgefleet/#",
    "edgefleet/+",
    "edgefleet/a/+",
    "edgefleet/+/b",
    "edgefleet/a/#",
    "edgefleet/+/+",
    "edgefleet/a/b",
    "edgefleet//b",
    "edgefleet/+/b/#",
    "edgefleet/a/+/c",
    "edgefleet/a/b/#",
    "edgefleet/+/#",
    "edgefleet/a/b/c/d/+",
)
TOPICS = (
    "edgefleet",
    "edgefleet/",
    "edgefleet/a",
    "edgefleet/a/",
    "edgefleet/a/b",
    "edgefleet/a/b/c",
    "edgefleet//b",
    "edgefleet/x/b",
    "edgefleet/a/x/c",
    "edgefleet/a/b/c/d",
    "edgefleet/b/b/x",
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with fleet_broker(tmp_path_factory.mktemp("mqtt"), ("dev-a",), workers=(WORKER, READER)) as b:
        yield b


def _raw_client(b: FleetBroker) -> tuple[mqtt.Client, queue.Queue[Any], threading.Event]:
    creds = b.creds[b.server]
    inbox: queue.Queue[Any] = queue.Queue()
    subacks: queue.Queue[Any] = queue.Queue()
    connected = threading.Event()
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=b.server, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.tls_set(str(creds.ca), str(creds.cert), str(creds.key))
    c.on_connect = lambda *_a: connected.set()
    c.on_subscribe = lambda _c, _u, mid, reasons, _p: subacks.put([r.is_failure for r in reasons])
    c.on_message = lambda _c, _u, m: inbox.put(m)
    c.connect(b.host, b.port, keepalive=30)
    c.loop_start()
    assert connected.wait(WAIT), "no connection"
    for n, f in enumerate((*FILTERS, SENTINEL), start=1):
        props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
        props.SubscriptionIdentifier = n
        c.subscribe(f, options=SubscribeOptions(qos=1), properties=props)
        assert subacks.get(timeout=WAIT) == [False], f"SUBACK refused {f}"
    return c, inbox, connected


def test_topic_matching_is_what_mosquitto_does(broker: FleetBroker) -> None:
    client, inbox, _ = _raw_client(broker)
    try:
        for topic in TOPICS:
            client.publish(topic, topic.encode(), qos=1)
        client.publish(SENTINEL, b"end", qos=1)  # delivered after everything before it
        seen: set[tuple[str, str]] = set()
        copies: Counter[str] = Counter()
        while True:
            m = inbox.get(timeout=WAIT)
            if m.topic == SENTINEL:
                break
            copies[m.topic] += 1
            for sid in m.properties.SubscriptionIdentifier:
                seen.add((m.topic, FILTERS[sid - 1]))
    finally:
        client.loop_stop()
        client.disconnect()
    expected = {(t, f) for t in TOPICS for f in FILTERS if topic_matches(f, t)}
    assert seen == expected
    # The double delivers the same number of copies (one per matching subscription).
    mem = MemoryBroker()
    c = mem.client("fleet.server")
    c.connect()
    for f in FILTERS:
        c.subscribe(f, lambda _m: None)
    for topic in TOPICS:
        c.publish(topic, b"x")
        assert mem.pump() == copies[topic], topic


# --------------------------------------------------------------------------- one scenario, two
def scenario(make: Callable[[str], Transport], pump: Callable[[], object]) -> dict[str, Any]:
    """Shared subscriptions and retained messages, observed through ``Transport`` only.

    ``make(identity)`` returns a connected client; ``pump`` delivers what is queued (the
    in-memory broker) or does nothing (a real broker delivers on its own threads). The end is
    a sentinel message to each subscriber, published after everything else.
    """
    got: dict[str, list[Message]] = {"w0": [], "w1": [], "plain": []}
    ended = threading.Condition()
    sentinels: list[str] = []

    def recorder(name: str) -> Callable[[Message], None]:
        def handle(m: Message) -> None:
            if m.topic != SENTINEL:
                got[name].append(m)
                return
            with ended:
                sentinels.append(name)
                ended.notify_all()

        return handle

    dev = make("dev-a")
    dev.wait_published(dev.publish("edgefleet/devices/dev-a/reported", b"r1", 1, True), WAIT)
    w0, w1 = make("fleet.server"), make(WORKER)
    for name, w in (("w0", w0), ("w1", w1)):
        w.subscribe("$share/g/edgefleet/devices/+/telemetry", recorder(name))
        w.subscribe("$share/g/edgefleet/devices/+/reported", recorder(name))
        w.subscribe(SENTINEL, recorder(name))
    reader = make(READER)
    reader.subscribe("edgefleet/devices/+/reported", recorder("plain"))
    reader.subscribe(SENTINEL, recorder("plain"))
    for n in range(6):
        dev.wait_published(dev.publish("edgefleet/devices/dev-a/telemetry", b"%d" % n), WAIT)
    dev.wait_published(dev.publish("edgefleet/devices/dev-a/reported", b"", 1, True), WAIT)
    w0.wait_published(w0.publish(SENTINEL, b"end"), WAIT)
    pump()
    with ended:
        assert ended.wait_for(lambda: sorted(sentinels) == ["plain", "w0", "w1"], WAIT), sentinels

    def telemetry(k: str) -> list[Message]:
        return [m for m in got[k] if m.topic.endswith("telemetry")]

    return {
        "telemetry": sorted(m.payload for k in ("w0", "w1") for m in telemetry(k)),
        "split": sorted(len(telemetry(k)) for k in ("w0", "w1")),
        "shared_reported": sorted(
            (m.payload, m.retain) for k in ("w0", "w1") for m in got[k] if "reported" in m.topic
        ),
        "plain_reported": [(m.payload, m.retain) for m in got["plain"]],
    }


def test_shared_and_retained_behave_alike(broker: FleetBroker) -> None:
    real: list[MqttClient] = []

    def make_real(identity: str) -> Transport:
        creds = broker.creds[identity]
        c = MqttClient(
            MqttConfig(
                host=broker.host,
                port=broker.port,
                device_id=identity,
                ca_path=creds.ca,
                cert_path=creds.cert,
                key_path=creds.key,
                announce_status=False,
                clean_start=True,
                session_expiry=0,
            )
        )
        real.append(c)
        c.connect()
        c.wait_connected(WAIT)
        return c

    try:
        on_mosquitto = scenario(make_real, lambda: None)
    finally:
        for c in real:
            c.close()

    # Mosquitto 2.0 hands a retained message to every new shared subscription too (MQTT 5 says
    # only non-shared ones get it; the double does that by default): compare like with like.
    mem = MemoryBroker(retained_to_shared=True)

    def make_memory(identity: str) -> Transport:
        c = mem.client(identity, clean_start=True, session_expiry=0)
        c.connect()
        return c

    in_memory = scenario(make_memory, mem.pump)
    assert on_mosquitto["telemetry"] == [b"%d" % n for n in range(6)]  # each exactly once
    assert on_mosquitto["split"] == [3, 3]  # round robin over the two members
    # The clear reached one member; the retained r1 reached both on their subscribe.
    assert on_mosquitto["shared_reported"] == [(b"", False), (b"r1", True), (b"r1", True)]
    assert on_mosquitto["plain_reported"] == [(b"r1", True), (b"", False)]
    assert in_memory == on_mosquitto
