"""edge_agent.common.mqtt against a real Mosquitto with TLS, client certificates and the fleet ACLs.

Each test is bounded (waits <= 10 s) and judges by what a server-side bare paho client
actually receives, not by what the adapter reports about itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import Message, MqttConfig, backoff_delay
from edge_agent.errors import EdgefleetError, NotConnectedError, TransportError
from mosquitto import FleetBroker, Peer, broker_fixture, free_port
from support import wait_until

broker = broker_fixture(scope="module", devices=("dev-a", "dev-b", "dev-c"))
WAIT = 10.0


def _config(b: FleetBroker, device: str, **overrides: Any) -> MqttConfig:
    creds = b.creds[device]
    values: dict[str, Any] = {
        "host": b.host,
        "port": b.port,
        "device_id": device,
        "ca_path": creds.ca,
        "cert_path": creds.cert,
        "key_path": creds.key,
        "prefix": b.prefix,
        "reconnect_min": 0.1,
        "reconnect_max": 1.0,
    }
    values.update(overrides)
    return MqttConfig(**values)


@pytest.fixture
def make(broker: FleetBroker) -> Iterator[Any]:
    """Factory for connected device clients and server peers, all closed afterwards."""
    made: list[MqttClient | Peer] = []

    def device(name: str, *, connect: bool = True, **overrides: Any) -> MqttClient:
        c = MqttClient(_config(broker, name, **overrides))
        made.append(c)
        if connect:
            c.connect()
            c.wait_connected(WAIT)
        return c

    def server() -> Peer:
        p = Peer(broker, broker.server, client_id=f"{broker.server}-{len(made)}")
        made.append(p)
        return p

    yield device, server
    for m in reversed(made):
        m.close()


def _is(topic: str, payload: bytes | None = None) -> Any:
    return lambda m: m.topic == topic and (payload is None or m.payload == payload)


def test_qos1_telemetry_reaches_a_shared_subscription(broker: FleetBroker, make: Any) -> None:
    device, server = make
    srv = server()
    srv.subscribe(f"$share/workers/{broker.prefix}/devices/+/telemetry")
    a = device("dev-a")
    handle = a.publish(broker.topic("dev-a", "telemetry"), b"t1", qos=1)
    a.wait_published(handle, WAIT)
    assert handle.is_published()
    msg = srv.wait_for(_is(broker.topic("dev-a", "telemetry"), b"t1"))
    assert msg.qos == 1
    assert a.stats().connects == 1


def test_tcp_nodelay_is_set_on_the_live_socket(make: Any) -> None:
    device, _ = make
    assert device("dev-a").tcp_nodelay() is True


def test_online_status_is_retained_on_connect(broker: FleetBroker, make: Any) -> None:
    device, server = make
    device("dev-c")
    srv = server()
    srv.subscribe(broker.topic("dev-c", "status"))
    msg = srv.wait_for(_is(broker.topic("dev-c", "status")))
    assert msg.retain
    status = json.loads(msg.payload)
    assert (status["state"], status["reason"], status["device_id"]) == (
        "online",
        "connected",
        "dev-c",
    )


def test_handler_that_publishes_and_waits_does_not_deadlock(broker: FleetBroker, make: Any) -> None:
    device, server = make
    srv = server()
    srv.subscribe(broker.topic("dev-a", "reported"))
    a = device("dev-a")
    done = threading.Event()

    def on_desired(msg: Message) -> None:
        # Publish-and-wait inside the handler: deadlocks if it ran on paho's thread.
        a.wait_published(a.publish(broker.topic("dev-a", "reported"), b"ack:" + msg.payload), 5)
        done.set()

    a.subscribe(broker.topic("dev-a", "desired"), on_desired)
    srv.client.publish(broker.topic("dev-a", "desired"), b"v2", qos=1)
    srv.wait_for(_is(broker.topic("dev-a", "reported"), b"ack:v2"))
    assert done.wait(WAIT)


def test_reconnects_by_itself_after_a_broker_restart(broker: FleetBroker, make: Any) -> None:
    device, server = make
    a = device("dev-a")
    broker.stop()
    try:
        wait_until(lambda: not a.connected, WAIT, what="the client to see the broker go")
        assert not a.connected
        with pytest.raises(NotConnectedError):
            a.publish(broker.topic("dev-a", "telemetry"), b"lost")
    finally:
        broker.start()
    a.wait_connected(WAIT)  # no call from the test: the client reconnected by itself
    srv = server()
    srv.subscribe(broker.topic("dev-a", "telemetry"))
    a.wait_published(a.publish(broker.topic("dev-a", "telemetry"), b"after"), WAIT)
    srv.wait_for(_is(broker.topic("dev-a", "telemetry"), b"after"))
    stats = a.stats()
    assert (stats.connects, stats.disconnects) == (2, 1)
    assert stats.publish_errors == 1
    assert a.tcp_nodelay(), "the new socket gets TCP_NODELAY too"


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge_agent.common.mqtt import MqttClient
    from edge_agent.common.mqtt_types import MqttConfig
    host, port, dev, ca, cert, key, prefix = sys.argv[1:]
    c = MqttClient(MqttConfig(host=host, port=int(port), device_id=dev, ca_path=Path(ca),
                              cert_path=Path(cert), key_path=Path(key), prefix=prefix))
    c.connect()
    c.wait_connected(10)
    print("ready", flush=True)
    time.sleep(30)  # alive (and connected) until the test kills it
    """
)


def test_last_will_offline_is_retained_when_the_client_dies(broker: FleetBroker, make: Any) -> None:
    _, server = make
    creds = broker.creds["dev-b"]
    args = [broker.host, str(broker.port), "dev-b", str(creds.ca), str(creds.cert)]
    args += [str(creds.key), broker.prefix]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        status = broker.topic("dev-b", "status")
        srv = server()
        srv.subscribe(status)
        srv.wait_for(lambda m: m.topic == status and json.loads(m.payload)["state"] == "online")
        child.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must send the will
        child.wait(WAIT)
        will = srv.wait_for(lambda m: m.topic == status, timeout=WAIT)
        assert json.loads(will.payload)["state"] == "offline"
        assert json.loads(will.payload)["reason"] == "connection_lost"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
    late = server()  # a subscriber arriving later still learns the device is offline
    late.subscribe(status)
    retained = late.wait_for(_is(status))
    assert retained.retain
    assert json.loads(retained.payload)["state"] == "offline"


def test_request_response_round_trip_with_correlation_data(broker: FleetBroker, make: Any) -> None:
    device, server = make
    responder = server()
    seen: list[bytes] = []

    def respond(_c: Any, _u: Any, msg: Any) -> None:
        corr = msg.properties.CorrelationData
        seen.append(corr)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = corr
        responder.client.publish(
            msg.properties.ResponseTopic, b"pong:" + msg.payload, 1, False, props
        )

    responder.client.on_message = respond
    responder.subscribe(f"{broker.prefix}/devices/+/fallback/req")
    a = device("dev-a")
    a.subscribe(broker.topic("dev-a", "fallback/resp/#"), lambda _m: None)
    resp_topic = broker.topic("dev-a", "fallback/resp/c1")
    for payload in (b"1", b"2"):
        reply = a.request(broker.topic("dev-a", "fallback/req"), payload, resp_topic, timeout=5)
        assert reply.payload == b"pong:" + payload
        assert reply.properties.correlation_data == seen[-1]
    assert len(set(seen)) == 2, "each request carries its own correlation data"


def test_publish_while_disconnected_raises_a_typed_error(broker: FleetBroker) -> None:
    dead = MqttClient(_config(broker, "dev-a", port=free_port()))
    with pytest.raises(NotConnectedError) as never_started:
        dead.publish(broker.topic("dev-a", "telemetry"), b"x")
    dead.connect()
    try:
        wait_until(lambda: dead.stats().connect_failures >= 1, WAIT, what="a refused attempt")
        with pytest.raises(NotConnectedError) as refused:
            dead.publish(broker.topic("dev-a", "telemetry"), b"x")
        assert dead.stats().connect_failures >= 1
    finally:
        dead.close()
    for err in (never_started.value, refused.value):
        assert isinstance(err, TransportError)
        assert isinstance(err, EdgefleetError)
    assert dead.stats().publish_errors == 2


def test_backoff_has_full_jitter_and_a_cap() -> None:
    assert backoff_delay(0, 0.5, 30, lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 30, lambda: 1.0) == 4.0
    assert backoff_delay(50, 0.5, 30, lambda: 1.0) == 30
    assert backoff_delay(10, 0.5, 30, lambda: 0.0) == 0.0
    import random

    rng = random.Random(1)
    delays = {round(backoff_delay(6, 0.5, 30, rng.random), 6) for _ in range(50)}
    assert len(delays) > 40, "a fleet must not reconnect in lockstep"


def test_concurrent_publishers_and_incoming_traffic_keep_the_session(
    broker: FleetBroker, make: Any
) -> None:
    # Regression: without on_socket_register_write paho wrote the TLS socket from caller
    # threads while the network thread read it, and the session died within ~20 requests.
    device, server = make
    srv = server()
    srv.subscribe(broker.topic("dev-a", "telemetry"))
    a = device("dev-a")
    got: list[bytes] = []
    a.subscribe(broker.topic("dev-a", "desired"), lambda m: got.append(m.payload))

    def burst(n: int) -> None:
        for i in range(50):
            a.wait_published(a.publish(broker.topic("dev-a", "telemetry"), b"%d-%d" % (n, i)), 5)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        srv.client.publish(broker.topic("dev-a", "desired"), b"%d" % i, qos=1)
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "publishers stuck"
    received: set[bytes] = set()

    def all_arrived() -> bool:
        with contextlib.suppress(queue.Empty):
            while True:
                received.add(srv.messages.get_nowait().payload)
        return len(received) >= 200 and len(got) >= 50

    wait_until(all_arrived, WAIT, what=lambda: f"{len(received)} of 200, {len(got)} of 50")
    assert len(received) == 200
    assert len(got) == 50
    assert a.stats().disconnects == 0
