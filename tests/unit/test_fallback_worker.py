"""fleet_server.fallback_worker with a fake MQTT client and fake/real models (no broker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.errors import InferenceError
from edge_agent.fallback_wire import FallbackRequest, FallbackResponse
from edge_agent.mqtt import Message, MessageProperties
from edge_agent.topics import Topics
from fleet_server.errors import FallbackServingError
from fleet_server.fallback_worker import (
    RESOLVE_MEMORY,
    CloudModel,
    CloudModels,
    FallbackWorker,
)

TOPICS = Topics("edgefleet")


class FakeClient:
    """Implements the part of MqttClient the worker uses; records publishes."""

    def __init__(self) -> None:
        self.subs: dict[str, Callable[[Message], None]] = {}
        self.sent: list[tuple[str, bytes, MessageProperties | None]] = []
        self.cv = threading.Condition()

    def subscribe(self, f: str, handler: Callable[[Message], None], qos: int = 1) -> None:
        self.subs[f] = handler

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> None:
        with self.cv:
            self.sent.append((topic, payload, properties))
            self.cv.notify_all()

    def wait(
        self, n: int, timeout: float = 5.0
    ) -> list[tuple[str, bytes, MessageProperties | None]]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.sent) >= n, timeout), self.sent
            return list(self.sent)


class FakeRuntime:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay, self.fail, self.calls = delay, fail, 0

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise InferenceError("boom")
        x = np.asarray(feeds["input"])
        out = np.zeros((x.shape[0], 3), np.float32)
        out[:, 1] = 1.0
        return {"probabilities": out}


def make(runtime: FakeRuntime | None = None, **kw: Any) -> tuple[FallbackWorker, FakeClient]:
    client = FakeClient()
    models = {"m": CloudModel("m", "7", runtime or FakeRuntime())}  # type: ignore[arg-type]
    w = FallbackWorker(client, models, TOPICS, "fleet", **kw)  # type: ignore[arg-type]
    w.start()
    return w, client


def msg(
    payload: bytes, device: str = "dev-a", reply: str | None = "default", corr: bytes | None = b"c1"
) -> Message:
    if reply == "default":
        reply = TOPICS.fallback_resp(device, "tok")
    props = MessageProperties(response_topic=reply, correlation_data=corr, message_expiry=1)
    return Message(TOPICS.fallback_req(device), payload, 1, False, props)


def req(deadline_ms: float = 1000, model: str = "m", **kw: Any) -> bytes:
    return FallbackRequest(
        model, {"input": np.zeros((2, 4), np.float32)}, deadline_ms, **kw
    ).to_bytes()


def test_subscribes_shared_and_answers_with_correlation() -> None:
    w, c = make()
    assert list(c.subs) == ["$share/fleet/edgefleet/devices/+/fallback/req"]
    w.handle(msg(req()))
    topic, payload, props = c.wait(1)[0]
    assert topic == TOPICS.fallback_resp("dev-a", "tok")
    assert props is not None
    assert props.correlation_data == b"c1"
    assert props.message_expiry == 1
    r = FallbackResponse.from_bytes(payload)
    assert r.ok
    assert r.model_version == "7"
    assert r.outputs["probabilities"].shape == (2, 3)
    w.close()
    assert w.stats()["answered"] == 1


@pytest.mark.parametrize(
    ("payload", "model", "code"),
    [(b"garbage", "unknown", "bad_request"), (req(model="nope"), "nope", "unknown_model")],
)
def test_bad_requests_get_error_responses(payload: bytes, model: str, code: str) -> None:
    w, c = make()
    w.handle(msg(payload))
    r = FallbackResponse.from_bytes(c.wait(1)[0][1])
    assert (r.error_code, r.model) == (code, model)
    assert w.stats()[f"errors_{code}"] == 1


def test_inference_failure_is_answered_and_counted() -> None:
    w, c = make(FakeRuntime(fail=True))
    w.handle(msg(req()))
    assert FallbackResponse.from_bytes(c.wait(1)[0][1]).error_code == "inference_failed"
    w.close()
    assert w.stats()["errors_inference_failed"] == 1


@pytest.mark.parametrize(
    "message",
    [
        msg(req(), reply=None),
        msg(req(), corr=None),
        msg(req(), reply=TOPICS.fallback_resp("dev-b", "tok")),  # another device's topic
        msg(req(), reply="edgefleet/devices/dev-a/desired"),
        msg(req(), reply="$SYS/x"),
    ],
)
def test_never_answers_where_the_device_may_not_read(message: Message) -> None:
    w, c = make()
    w.handle(message)
    w.close()
    assert c.sent == []
    assert w.stats()["dropped_no_reply"] == 1


def test_request_on_a_foreign_topic_is_dropped() -> None:
    w, c = make()
    w.handle(Message("other/topic", req(), 1, False, msg(req()).properties))
    w.close()
    assert c.sent == []
    assert w.stats()["dropped_bad_topic"] == 1


def test_expired_in_queue_is_dropped_not_answered() -> None:
    slow = FakeRuntime(delay=0.3)
    w, c = make(slow, threads=1)
    w.handle(msg(req(2000), corr=b"long"))
    w.handle(msg(req(50), corr=b"short"))  # waits behind the slow one past its deadline
    time.sleep(0.5)
    w.close()
    assert [p.correlation_data for _, _, p in c.sent if p] == [b"long"]
    s = w.stats()
    assert s["expired"] == 1
    assert slow.calls == 1
    assert s["queue_wait_ms_p99"] >= 250


def test_answer_computed_past_the_deadline_is_not_sent() -> None:
    w, c = make(FakeRuntime(delay=0.1))
    w.handle(msg(req(20)))
    time.sleep(0.3)
    w.close()
    assert c.sent == []
    assert w.stats()["late"] == 1


def test_full_queue_answers_overloaded() -> None:
    gate = threading.Event()

    class Blocking(FakeRuntime):
        def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
            gate.wait(5)
            return super().run(feeds)

    w, c = make(Blocking(), threads=1, max_queue=1)
    for i in range(3):  # one running, one queued, one refused
        w.handle(msg(req(), corr=b"%d" % i))
        time.sleep(0.05)  # let the pool thread take the first one
    time.sleep(0.05)
    refused = [FallbackResponse.from_bytes(p) for _, p, _ in c.sent]
    assert [r.error_code for r in refused] == ["overloaded"]
    gate.set()
    c.wait(3)
    w.close()
    assert w.stats()["answered"] == 2


def test_device_outputs_count_disagreement() -> None:
    w, c = make()
    agree = np.zeros((2, 3), np.float32)
    agree[:, 1] = 1
    differ = agree.copy()
    differ[0] = [1, 0, 0]
    w.handle(msg(req(device_outputs={"probabilities": agree})))
    w.handle(msg(req(device_outputs={"probabilities": differ})))
    c.wait(2)
    w.close()
    s = w.stats()
    assert (s["compared"], s["compared_rows"], s["disagree_rows"]) == (2, 4, 1)


def test_bad_settings_and_dirs(tmp_path: Path) -> None:
    with pytest.raises(FallbackServingError):
        FallbackWorker(FakeClient(), {}, TOPICS, "bad/group")  # type: ignore[arg-type]
    with pytest.raises(FallbackServingError):
        FallbackWorker(FakeClient(), {}, TOPICS, threads=0)  # type: ignore[arg-type]
    with pytest.raises(FallbackServingError, match="cannot list"):
        CloudModels.from_dir(tmp_path / "missing")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(FallbackServingError, match="cannot load"):
        CloudModels.from_dir(tmp_path)


def test_cloud_models_from_bundles_and_dir_serve_real_digits(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    from datetime import UTC, datetime

    root = digits_bundles.keys.trusted_root()
    paths = [digits_bundles.path(v) for v in (1, 3, 2)]
    models = CloudModels.from_bundles(paths, root, now=datetime.now(UTC))
    assert list(models) == ["digits"]
    assert models["digits"].version == "3"
    from edge_agent.bundle import read_bundle

    art = read_bundle(paths[0], root, now=datetime.now(UTC), installed_version=None, device=None)
    (tmp_path / "digits.onnx").write_bytes(art.artifact)
    by_dir = CloudModels.from_dir(tmp_path)
    assert by_dir["digits"].version.startswith("sha256:")
    client = FakeClient()
    w = FallbackWorker(client, models, TOPICS)  # type: ignore[arg-type]
    w.start()
    x = digits_bundles.x_eval[:32]
    w.handle(msg(FallbackRequest("digits", {"input": x}, 2000).to_bytes()))
    r = FallbackResponse.from_bytes(client.wait(1)[0][1])
    w.close()
    pred = np.argmax(r.outputs["probabilities"], axis=1)
    assert (pred == digits_bundles.y_eval[:32]).mean() > 0.9


def test_unknown_model_is_resolved_once_then_served_and_failures_are_rate_limited() -> None:
    asked: list[str] = []
    now = [100.0]

    def resolve(name: str) -> CloudModel | None:
        asked.append(name)
        if name == "late":
            return CloudModel("late", "3", FakeRuntime())  # type: ignore[arg-type]
        return None

    w, c = make(resolve=resolve, clock=lambda: now[0])
    w.handle(msg(req(model="late")))  # published after the worker started
    r = FallbackResponse.from_bytes(c.wait(1)[0][1])
    assert r.ok
    assert r.model_version == "3"
    w.handle(msg(req(model="late")))
    assert FallbackResponse.from_bytes(c.wait(2)[1][1]).ok
    assert asked == ["late"]  # loaded once, then served from memory
    for _ in range(3):  # a name nobody published: asked once per RESOLVE_EVERY
        w.handle(msg(req(model="ghost")))
    answers = [FallbackResponse.from_bytes(p) for _, p, _ in c.wait(5)[2:]]
    assert [a.error_code for a in answers] == ["unknown_model"] * 3
    assert asked == ["late", "ghost"]
    now[0] += 11.0
    w.handle(msg(req(model="ghost")))
    assert FallbackResponse.from_bytes(c.wait(6)[5][1]).error_code == "unknown_model"
    assert asked == ["late", "ghost", "ghost"]
    w.close()
    assert w.stats()["models_loaded"] == 1


def test_resolving_runs_on_the_pool_not_the_mqtt_handler_thread() -> None:
    threads: list[str] = []
    gate = threading.Event()

    def resolve(name: str) -> CloudModel | None:
        threads.append(threading.current_thread().name)
        gate.wait(5)  # a slow database / bundle verification / session build
        return CloudModel(name, "1", FakeRuntime())  # type: ignore[arg-type]

    w, c = make(resolve=resolve)
    started = time.monotonic()
    w.handle(msg(req(model="late", deadline_ms=5000), corr=b"late"))
    w.handle(msg(req(deadline_ms=5000), corr=b"m"))  # a known model is not held up either
    assert time.monotonic() - started < 1.0  # the handler returned while resolve still runs
    props = c.wait(1)[0][2]  # answered while "late" is still being resolved
    assert props is not None
    assert props.correlation_data == b"m"
    gate.set()
    r = FallbackResponse.from_bytes(c.wait(2)[1][1])
    w.close()
    assert (r.ok, r.model) == (True, "late")
    assert len(threads) == 1
    assert threads[0].startswith("fallback-")


def test_a_newer_published_version_is_picked_up_within_resolve_every() -> None:
    published = {"version": "3"}
    asked: list[str] = []
    now = [100.0]

    def resolve(name: str) -> CloudModel | None:
        asked.append(name)
        return CloudModel(name, published["version"], FakeRuntime())  # type: ignore[arg-type]

    w, c = make(resolve=resolve, clock=lambda: now[0])

    def served(model: str) -> str:
        n = len(c.sent) + 1
        w.handle(msg(req(model=model)))
        r = FallbackResponse.from_bytes(c.wait(n)[-1][1])
        assert r.ok, r.error_message
        return r.model_version

    assert served("m") == "7"  # the models it started with count as just resolved
    assert served("digits") == "3"
    published["version"] = "4"  # a newer bundle is published
    now[0] += 9.0
    assert served("digits") == "3"  # not asked again yet
    assert asked == ["digits"]
    now[0] += 2.0
    assert served("digits") == "4"  # asked again, swapped in
    assert served("m") == "4"  # so is a model it started with
    now[0] += 11.0
    assert served("digits") == "4"  # asked again, same version: kept
    assert asked == ["digits", "digits", "m", "digits"]
    w.close()
    assert w.stats()["models_loaded"] == 3  # digits v3, digits v4, m v4


def test_names_remembered_for_rate_limiting_are_bounded() -> None:
    asked: list[str] = []

    def resolve(name: str) -> CloudModel | None:
        asked.append(name)
        return None

    w, c = make(resolve=resolve, clock=lambda: 100.0, max_queue=4096)
    names = [f"ghost-{i}" for i in range(RESOLVE_MEMORY + 1)]  # device-chosen names
    for name in names:
        w.handle(msg(req(model=name)))
    c.wait(len(names), timeout=30)
    assert sorted(asked) == sorted(names)
    asked.clear()
    w.handle(msg(req(model=names[-1])))  # recent: still remembered, not asked again
    w.handle(msg(req(model=names[0])))  # the oldest was forgotten: asked again
    c.wait(len(names) + 2)
    w.close()
    assert asked == [names[0]]
