"""fleet_server.fallback.worker with a fake MQTT client and fake/real models (no broker)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from clock import FakeClock
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.errors import InferenceError
from edge_agent.wire.fallback import FallbackRequest, FallbackResponse
from edge_agent.wire.topics import Topics
from fleet_server.errors import FallbackServingError
from fleet_server.fallback.cloud_models import CloudModel, CloudModels
from fleet_server.fallback.worker import MAX_LOADED, RESOLVE_MEMORY, FallbackWorker
from support import wait_until

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
    """A model: ``delay`` seconds on ``clock`` per run (a slow model on the test's fake clock)."""

    def __init__(
        self, delay: float = 0.0, fail: bool = False, clock: FakeClock | None = None
    ) -> None:
        self.delay, self.fail, self.calls, self.clock = delay, fail, 0, clock

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.clock is not None:
            self.clock.advance(self.delay)
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
    clock = FakeClock()
    gate, running = threading.Event(), threading.Event()

    class Slow(FakeRuntime):
        def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
            running.set()
            gate.wait(5)
            return super().run(feeds)  # takes 0.3 s on the fake clock

    slow = Slow(delay=0.3, clock=clock)
    w, c = make(slow, threads=1, clock=clock)
    w.handle(msg(req(2000), corr=b"long"))
    assert running.wait(5)  # the pool's only thread runs it (nothing racing the clock)
    w.handle(msg(req(50), corr=b"short"))  # waits behind the slow one past its deadline
    gate.set()
    wait_until(lambda: w.stats().get("expired") == 1, 5.0, what="the short one dropped")
    w.close()
    assert [p.correlation_data for _, _, p in c.sent if p] == [b"long"]
    s = w.stats()
    assert s["expired"] == 1
    assert slow.calls == 1
    assert s["queue_wait_ms_p99"] >= 250


def test_answer_computed_past_the_deadline_is_not_sent() -> None:
    clock = FakeClock()
    w, c = make(FakeRuntime(delay=0.1, clock=clock), clock=clock)
    w.handle(msg(req(20)))
    wait_until(lambda: w.stats().get("late") == 1, 5.0, what="the late answer dropped")
    w.close()
    assert c.sent == []
    assert w.stats()["late"] == 1


def test_full_queue_answers_overloaded() -> None:
    gate, running = threading.Event(), threading.Event()

    class Blocking(FakeRuntime):
        def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
            running.set()
            gate.wait(5)
            return super().run(feeds)

    w, c = make(Blocking(), threads=1, max_queue=1)
    w.handle(msg(req(), corr=b"0"))
    # The pool's only thread has taken the first off the queue (no race on how soon it does).
    assert running.wait(5)
    for i in (1, 2):  # one queued, one refused (answered at once, in handle)
        w.handle(msg(req(), corr=b"%d" % i))
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


class FakeSource:
    """A ``CloudModelSource``: ``published`` versions per name, ``running`` versions per device."""

    def __init__(self, published: dict[str, set[int]], running: dict[str, int] | None = None):
        self.published, self.running = published, running or {}
        self.asked: list[tuple[str, int]] = []
        self.threads: list[str] = []
        self.gate: threading.Event | None = None

    def load(self, name: str, version: int) -> CloudModel | None:
        self.asked.append((name, version))
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(5)  # a slow database / bundle verification / session build
        if version not in self.published.get(name, set()):
            return None
        return CloudModel(name, str(version), FakeRuntime())  # type: ignore[arg-type]

    def version_of(self, name: str, device_id: str) -> int | None:
        return self.running.get(device_id)


def answer(w: FallbackWorker, c: FakeClient, device: str = "dev-a", **kw: Any) -> FallbackResponse:
    n = len(c.sent) + 1
    w.handle(msg(req(**kw), device=device))
    return FallbackResponse.from_bytes(c.wait(n)[-1][1])


def sourced(source: FakeSource, **kw: Any) -> tuple[FallbackWorker, FakeClient]:
    client = FakeClient()
    w = FallbackWorker(client, {}, TOPICS, "fleet", source=source, **kw)  # type: ignore[arg-type]
    w.start()
    return w, client


def test_each_device_is_answered_by_the_version_it_runs_not_the_newest() -> None:
    source = FakeSource({"m": {1, 2}})
    w, c = sourced(source)
    assert answer(w, c, model_version=1).model_version == "1"
    assert answer(w, c, model_version=2).model_version == "2"
    assert answer(w, c, model_version=1).model_version == "1"  # v2 published: v1 unchanged
    w.close()
    assert source.asked == [("m", 1), ("m", 2)]  # versions are immutable: loaded once
    assert w.stats()["models_loaded"] == 2


@pytest.mark.parametrize("version", [3, 99])
def test_a_version_not_published_is_refused_typed_never_the_newest(version: int) -> None:
    w, c = sourced(FakeSource({"m": {1, 2}}))
    r = answer(w, c, model_version=version)
    w.close()
    assert (r.ok, r.error_code, r.outputs) == (False, "unknown_version", {})
    assert f"v{version}" in r.error_message
    assert w.stats()["errors_unknown_version"] == 1


def test_an_older_agent_is_answered_with_what_the_registry_says_it_runs() -> None:
    # Requests without model_version (agents before the field): the registry decides.
    w, c = sourced(FakeSource({"m": {1, 2}}, running={"dev-a": 1, "dev-b": 2, "dev-c": 5}))
    assert answer(w, c, device="dev-a").model_version == "1"
    assert answer(w, c, device="dev-b").model_version == "2"
    # Unknown device, or a version that is not published: the old code, never the newest.
    for device in ("dev-c", "dev-new"):
        r = answer(w, c, device=device)
        assert (r.ok, r.error_code) == (False, "unknown_model")
    w.close()


def test_refusals_are_rate_limited_per_version_and_their_memory_is_bounded() -> None:
    now = [100.0]
    source = FakeSource({"m": {1}})
    w, c = sourced(source, clock=lambda: now[0], max_queue=4096)
    for _ in range(3):  # a version nobody published: asked once per RESOLVE_EVERY
        assert answer(w, c, model_version=9).error_code == "unknown_version"
    assert source.asked == [("m", 9)]
    now[0] += 11.0
    assert answer(w, c, model_version=9).error_code == "unknown_version"
    assert source.asked == [("m", 9)] * 2
    source.asked.clear()
    versions = list(range(100, 100 + RESOLVE_MEMORY + 1))  # device-chosen versions
    before = len(c.sent)
    for v in versions:
        w.handle(msg(req(model_version=v)))
    c.wait(before + len(versions), timeout=30)
    assert sorted(source.asked) == [("m", v) for v in versions]
    source.asked.clear()
    answer(w, c, model_version=versions[-1])  # recent: remembered, not asked again
    answer(w, c, model_version=versions[0])  # the oldest was forgotten: asked again
    w.close()
    assert source.asked == [("m", versions[0])]


def test_loaded_models_are_bounded_and_reloaded_when_asked_again() -> None:
    source = FakeSource({"m": set(range(1, MAX_LOADED + 2))})
    w, c = sourced(source)
    for v in range(1, MAX_LOADED + 2):
        assert answer(w, c, model_version=v).model_version == str(v)
    assert answer(w, c, model_version=MAX_LOADED + 1).ok  # most recent: kept
    assert answer(w, c, model_version=1).ok  # the least recently used was dropped
    w.close()
    assert source.asked.count(("m", 1)) == 2
    assert source.asked.count(("m", MAX_LOADED + 1)) == 1


def test_loading_runs_on_the_pool_not_the_mqtt_handler_thread() -> None:
    source = FakeSource({"m": {1, 2}})
    w, c = sourced(source)
    assert answer(w, c, model_version=1).ok  # v1 loaded
    source.gate = threading.Event()
    w.handle(msg(req(deadline_ms=5000, model_version=2), corr=b"v2"))
    w.handle(msg(req(deadline_ms=5000, model_version=1), corr=b"v1"))  # not held up
    props = c.wait(2)[1][2]  # answered while v2 is still being loaded
    assert props is not None
    assert props.correlation_data == b"v1"
    source.gate.set()
    r = FallbackResponse.from_bytes(c.wait(3)[2][1])
    w.close()
    assert (r.ok, r.model_version) == (True, "2")
    assert all(t.startswith("fallback-") for t in source.threads)


def test_without_a_source_the_configured_model_answers_every_version() -> None:
    w, c = make()
    assert answer(w, c, model_version=4).model_version == "7"
    assert answer(w, c).model_version == "7"
    r = answer(w, c, model="other", model_version=4)
    w.close()
    assert r.error_code == "unknown_version"
