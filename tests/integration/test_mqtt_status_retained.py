"""A clean shutdown leaves the device's ``offline``/``shutdown`` status retained at the broker.

The paho adapter published it without the retain flag (the in-memory client retained it), so
on a real broker the retained status stayed ``online`` after ``close``: a server or consumer
subscribing later saw a stopped device as online until the presence timeout. Now both take
QoS and retain from ``TOPIC_SPECS["status"]``. Judged by what a late bare-paho subscriber gets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.wire.topics import TOPIC_SPECS
from mosquitto import FleetBroker, Peer, broker_fixture

broker = broker_fixture(scope="module", devices=("dev-s",))
WAIT = 10.0


@pytest.fixture
def peers(broker: FleetBroker) -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def _device(b: FleetBroker, device: str) -> MqttClient:
    creds = b.creds[device]
    return MqttClient(
        MqttConfig(
            host=b.host,
            port=b.port,
            device_id=device,
            ca_path=creds.ca,
            cert_path=creds.cert,
            key_path=creds.key,
            prefix=b.prefix,
        )
    )


def _late_status(b: FleetBroker, peers: list[Peer], topic: str) -> Any:
    late = Peer(b, b.server, client_id=f"{b.server}-late-{len(peers)}")
    peers.append(late)
    late.subscribe(topic)
    return late.wait_for(lambda m: m.topic == topic, timeout=WAIT)


def test_clean_close_leaves_offline_shutdown_retained(
    broker: FleetBroker, peers: list[Peer]
) -> None:
    assert TOPIC_SPECS["status"].retain
    topic = broker.topic("dev-s", "status")
    client = _device(broker, "dev-s")
    client.connect()
    client.wait_connected(WAIT)
    online = _late_status(broker, peers, topic)
    assert online.retain
    assert json.loads(online.payload)["state"] == "online"
    client.close()
    retained = _late_status(broker, peers, topic)
    assert retained.retain
    status = json.loads(retained.payload)
    assert (status["state"], status["reason"]) == ("offline", "shutdown")
