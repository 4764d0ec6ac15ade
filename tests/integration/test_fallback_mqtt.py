"""Cloud fallback end to end: Agent + MqttFallbackTransport -> real Mosquitto (TLS, ACLs) ->
FallbackWorker serving the real digits model with onnxruntime."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from clock import FakeClock
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.config import AgentConfig, FallbackConfig, StoreConfig
from edge_agent.errors import FallbackError, TransportTimeoutError
from edge_agent.serving.agent import Agent
from edge_agent.serving.fallback import CloudFallbackError
from edge_agent.serving.fallback_mqtt import MqttFallbackTransport
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from edge_agent.wire.fallback import FallbackRequest, FallbackResponse
from edge_agent.wire.topics import Topics
from fleet_server.fallback.cloud_models import CloudModel, CloudModels
from fleet_server.fallback.worker import FallbackWorker
from mosquitto import FleetBroker, broker_fixture
from support import DEVICE, wait_until

broker = broker_fixture(scope="module", devices=("dev-a", "dev-b"), workers=("w2.server",))
WAIT = 10.0


def cfg(b: FleetBroker, identity: str, **kw: Any) -> MqttConfig:
    c = b.creds[identity]
    values: dict[str, Any] = {
        "host": b.host,
        "port": b.port,
        "device_id": identity,
        "ca_path": c.ca,
        "cert_path": c.cert,
        "key_path": c.key,
        "prefix": b.prefix,
        "reconnect_min": 0.1,
        "reconnect_max": 0.5,
    }
    values.update(kw)
    return MqttConfig(**values)


@pytest.fixture
def clients(broker: FleetBroker) -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.close()


def connect(made: list[MqttClient], b: FleetBroker, identity: str, **kw: Any) -> MqttClient:
    c = MqttClient(cfg(b, identity, **kw))
    c.connect()
    c.wait_connected(WAIT)
    made.append(c)
    return c


@pytest.fixture(scope="module")
def digits(digits_bundles: DigitsBundles) -> dict[str, CloudModel]:
    root = digits_bundles.keys.trusted_root()
    return CloudModels.from_bundles([digits_bundles.path(3)], root, now=datetime.now(UTC))


class SlowRuntime:
    """A runtime that takes ``delay`` seconds (to miss deadlines on purpose)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def run(self, feeds: Any) -> Any:
        time.sleep(self.delay)  # the slowness under test: the deadline passes on the wall clock
        return self.inner.run(feeds)


class GatedRuntime:
    """A runtime that says when it starts and finishes only when the test lets it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started, self.release = threading.Event(), threading.Event()

    def run(self, feeds: Any) -> Any:
        self.started.set()
        self.release.wait(WAIT)
        return self.inner.run(feeds)


def slow(models: dict[str, CloudModel], delay: float) -> dict[str, CloudModel]:
    m = models["digits"]
    return {"digits": dataclasses.replace(m, runtime=SlowRuntime(m.runtime, delay))}  # type: ignore[arg-type]


def worker(
    made: list[MqttClient], b: FleetBroker, models: Any, identity: str = "", **kw: Any
) -> FallbackWorker:
    client = connect(
        made, b, identity or b.server, announce_status=False, clean_start=True, session_expiry=0
    )
    w = FallbackWorker(client, models, Topics(b.prefix), "fb", **kw)
    w.start()
    return w


def agent(
    tmp: Path, bundles: DigitsBundles, transport: Any, mode: str, install: bool = False, **fb: Any
) -> Agent:
    config = AgentConfig(
        device_id="dev-a",
        store=StoreConfig(state_dir=str(tmp / "state")),
        fallback=FallbackConfig(mode=mode, **fb),
    )
    store = ModelStore(tmp / "state", bundles.keys.trusted_root(), DEVICE)
    a = Agent(config, store, transport=transport, background_drift=False)
    if install:
        a.install(bundles.path(1))
    a.start()
    return a


def test_cloud_only_agent_gets_real_cloud_answers(
    broker: FleetBroker,
    clients: list[MqttClient],
    digits: Any,
    tmp_path: Path,
    digits_bundles: DigitsBundles,
) -> None:
    w = worker(clients, broker, digits)
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    a = agent(tmp_path, digits_bundles, transport, "cloud_only", deadline_ms=2000)
    x = digits_bundles.x_eval[:64]
    res = a.infer(InferenceRequest("digits", {"input": x}))
    assert res.source == "cloud"
    assert res.parameters["fallback_reason"] == "local_unavailable"  # nothing installed
    pred = np.argmax(res.outputs["probabilities"], axis=1)
    assert (pred == digits_bundles.y_eval[:64]).mean() > 0.9
    # Counters are bumped just after the answer is queued.
    wait_until(lambda: w.stats()["answered"] == 1, WAIT, what="the answer counted")
    assert a.cloud is not None
    assert a.cloud.stats()["ok"] == 1


def test_prefer_device_with_a_hard_example_and_disagreement_counters(
    broker: FleetBroker,
    clients: list[MqttClient],
    digits: Any,
    tmp_path: Path,
    digits_bundles: DigitsBundles,
) -> None:
    w = worker(clients, broker, digits)
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    # min_confidence 1.0: every local answer is a hard example and goes to the cloud.
    a = agent(
        tmp_path,
        digits_bundles,
        transport,
        "prefer_device",
        install=True,
        deadline_ms=2000,
        min_confidence=1.0,
    )
    x = digits_bundles.x_eval[:16]
    res = a.infer(InferenceRequest("digits", {"input": x}))
    assert res.source == "cloud"
    assert res.parameters["fallback_reason"] == "low_confidence"
    # The agent sent its own answer along with the hard example: the comparison is counted.
    assert transport.stats()["compared"] == 1
    assert transport.stats()["compared_rows"] == 16
    agreeing = transport.stats()["disagree_rows"]
    assert a.status()["counts"]["fallback_compared_rows"] == 16  # reaches telemetry counts
    # A device answer that disagrees everywhere: both sides count every row.
    local = a.infer(InferenceRequest("digits", {"input": x})).outputs  # cloud again
    transport.request(
        "digits",
        {"input": x},
        deadline_s=2.0,
        reason="low_confidence",
        device_outputs={"probabilities": np.roll(np.asarray(local["probabilities"]), 1, axis=1)},
    )
    s = transport.stats()
    assert s["compared"] == 3
    assert s["compared_rows"] == 48
    assert s["disagree_rows"] - 2 * agreeing == 16
    assert transport.telemetry_counts()["fallback_disagree_rows"] == s["disagree_rows"]
    assert w.stats()["disagree_rows"] == s["disagree_rows"]


def test_deadline_miss_is_typed_and_opens_the_breaker(
    broker: FleetBroker,
    clients: list[MqttClient],
    digits: Any,
    tmp_path: Path,
    digits_bundles: DigitsBundles,
) -> None:
    w = worker(clients, broker, slow(digits, 0.3))
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    a = agent(
        tmp_path,
        digits_bundles,
        transport,
        "cloud_only",
        deadline_ms=100,
        breaker_failures=2,
        breaker_reset_seconds=60,
    )
    req = InferenceRequest("digits", {"input": digits_bundles.x_eval[:1]})
    for _ in range(2):
        with pytest.raises(CloudFallbackError) as err:
            a.infer(req)
        assert err.value.reason == "deadline"
    with pytest.raises(CloudFallbackError) as err:
        a.infer(req)
    assert err.value.reason == "breaker_open"
    wait_until(lambda: w.stats()["late"] >= 2, WAIT, what="both slow runs finished")
    assert w.stats()["late"] == 2, "answers computed past the deadline are not sent"
    assert w.stats()["answered"] == 0


def test_two_workers_share_requests(
    broker: FleetBroker, clients: list[MqttClient], digits: Any, digits_bundles: DigitsBundles
) -> None:
    w1 = worker(clients, broker, digits)
    w2 = worker(clients, broker, digits, identity="w2.server")
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    x = digits_bundles.x_eval[:1]
    for _ in range(20):
        transport.request("digits", {"input": x}, deadline_s=2.0, reason="cloud_only")
    wait_until(
        lambda: w1.stats()["answered"] + w2.stats()["answered"] >= 20, WAIT, what="20 answers"
    )
    a1, a2 = w1.stats()["answered"], w2.stats()["answered"]
    assert a1 + a2 == 20, "each request answered exactly once"
    assert a1 > 0
    assert a2 > 0


def test_expired_request_is_not_answered(
    broker: FleetBroker, clients: list[MqttClient], digits: Any, digits_bundles: DigitsBundles
) -> None:
    runtime = GatedRuntime(digits["digits"].runtime)
    models = {"digits": dataclasses.replace(digits["digits"], runtime=runtime)}
    clock = FakeClock()  # the worker's: the queued request's wait is what the test makes it
    w = worker(clients, broker, models, threads=1, clock=clock)
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    x = digits_bundles.x_eval[:1]
    first = threading.Thread(
        target=transport.request,
        args=("digits", {"input": x}),
        kwargs={"deadline_s": 2.0, "reason": "r"},
    )
    first.start()
    assert runtime.started.wait(WAIT)  # the pool's only thread is busy until released
    with pytest.raises(CloudFallbackError) as err:
        transport.request("digits", {"input": x}, deadline_s=0.15, reason="r")
    assert err.value.reason == "deadline"
    wait_until(lambda: w.stats()["queued"] == 1, WAIT, what="the second request queued")
    clock.advance(0.3)  # while the first one runs
    runtime.release.set()
    first.join(WAIT)
    wait_until(lambda: w.stats()["expired"] >= 1, WAIT, what="the queued request dropped")
    s = w.stats()
    assert s["expired"] == 1, "dropped in the queue, never run"
    assert s["answered"] == 1
    assert s["queue_wait_ms_p99"] >= 150


def test_bad_request_gets_a_typed_error(
    broker: FleetBroker, clients: list[MqttClient], digits: Any
) -> None:
    w = worker(clients, broker, digits)
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, Topics(broker.prefix), "dev-a")
    with pytest.raises(FallbackError) as err:
        transport.request(
            "nope", {"input": np.zeros((1, 64), np.float32)}, deadline_s=2.0, reason="r"
        )
    assert getattr(err.value, "remote_code", None) == "unknown_model"
    topics = Topics(broker.prefix)
    msg = dev.request(
        topics.fallback_req("dev-a"), b"junk", topics.fallback_resp("dev-a", "x"), WAIT
    )
    assert FallbackResponse.from_bytes(msg.payload).error_code == "bad_request"
    assert w.stats()["errors_bad_request"] == 1


def test_dev_b_cannot_read_dev_a_responses(
    broker: FleetBroker, clients: list[MqttClient], digits: Any, digits_bundles: DigitsBundles
) -> None:
    w = worker(clients, broker, digits)
    server = clients[0]  # the worker's session
    topics = Topics(broker.prefix)
    spy = connect(clients, broker, "dev-b")
    seen: list[Any] = []
    spy.subscribe(topics.all_devices("fallback_resp"), seen.append)
    spy.subscribe(topics.fallback_resp_filter("dev-a"), seen.append)
    dev = connect(clients, broker, "dev-a")
    transport = MqttFallbackTransport(dev, topics, "dev-a")
    transport.request("digits", {"input": digits_bundles.x_eval[:1]}, deadline_s=2.0, reason="r")
    # dev-b asking the server to answer into dev-a's topics is refused by the worker too.
    payload = FallbackRequest("digits", {"input": digits_bundles.x_eval[:1]}, 500).to_bytes()
    with pytest.raises(TransportTimeoutError):
        spy.request(topics.fallback_req("dev-b"), payload, topics.fallback_resp("dev-a", "z"), 0.5)
    wait_until(lambda: w.stats()["dropped_no_reply"] == 1, WAIT, what="the forged request dropped")
    # The worker's session published dev-a's answer before this fence (QoS 1, same client, so
    # in order): once dev-b has the fence, it would have had the answer too.
    server.publish(topics.fallback_resp("dev-b", "fence"), b"fence", 1)
    wait_until(lambda: any(m.payload == b"fence" for m in seen), WAIT, what="the fence")
    assert [m for m in seen if m.payload != b"fence"] == []
