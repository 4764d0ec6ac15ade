"""A/B routing and shadow evaluation against a real onnxruntime candidate."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from clock import FakeClock
from edge_agent.contract import OutputContract
from edge_agent.errors import ConfigError, InferenceError
from edge_agent.runtime.base import RuntimeOptions, Tensor
from edge_agent.runtime.onnx import OnnxRuntime
from edge_agent.serving.shadow import ABRouter, ShadowRunner, key_fraction

W = np.asarray(
    [[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [-1.0, 0.5, 1.0], [0.5, 0.0, -1.0]], dtype=np.float32
)
CLASSIFIER = OutputContract(
    task="classification", outputs=("probs",), labels=("a", "b", "c"), score_output="probs"
)
RAW = OutputContract(task="raw", outputs=("probs",))


def softmax_model() -> bytes:
    """x[N, 4] -> MatMul(W[4, 3]) -> Softmax -> probs[N, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "shadow_candidate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def expected_probs(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) @ W.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def candidate() -> OnnxRuntime:
    return OnnxRuntime(softmax_model(), RuntimeOptions(warmup_runs=1))


class Gated:
    """Wraps a real runtime; ``run`` waits for ``gate`` (a slow candidate)."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.name, self.version = inner.name, inner.version
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.run(feeds)

    def close(self) -> None:
        pass


def runner(
    cand: object,
    *,
    fraction: float = 1.0,
    queue_size: int = 64,
    contract: OutputContract = CLASSIFIER,
    seed: int = 0,
    step: float = 0.002,
    **kw: float,
) -> ShadowRunner:
    return ShadowRunner(
        cand,  # type: ignore[arg-type]
        fraction,
        queue_size,
        contract,
        random.Random(seed),
        FakeClock(0.0, tick=step),  # every run takes ``step``
        **kw,  # type: ignore[arg-type]
    )


def batch(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


# --------------------------------------------------------------------------------- A/B router
def test_key_fraction_is_blake2b_of_the_key() -> None:
    digest = hashlib.blake2b(b"camera-7", digest_size=8).digest()
    assert key_fraction("camera-7") == (int.from_bytes(digest, "big") >> 11) / 2.0**53
    values = [key_fraction(f"k{i}") for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_ab_fraction_over_10000_keys(fraction: float) -> None:
    router = ABRouter(fraction, seed=1)
    arms = [router.arm(f"user-{i}") for i in range(10_000)]
    share = arms.count("candidate") / len(arms)
    assert abs(share - fraction) < 0.015
    assert router.counts() == {"live": arms.count("live"), "candidate": arms.count("candidate")}


def test_ab_sticky_per_key_across_calls_seeds_and_instances() -> None:
    a, b = ABRouter(0.3, seed=1), ABRouter(0.3, seed=99)
    keys = [f"session-{i}" for i in range(500)]
    first = [a.arm(k) for k in keys]
    assert [a.arm(k) for k in keys] == first
    assert [b.arm(k) for k in reversed(keys)] == list(reversed(first))
    assert {"live", "candidate"} == set(first)


def test_ab_raising_the_fraction_only_moves_keys_to_the_candidate() -> None:
    keys = [f"d{i}" for i in range(3000)]
    low = {k for k in keys if ABRouter(0.1).arm(k) == "candidate"}
    high = {k for k in keys if ABRouter(0.4).arm(k) == "candidate"}
    assert low < high


def test_ab_edges_and_validation() -> None:
    assert {ABRouter(0.0).arm(f"k{i}") for i in range(1000)} == {"live"}
    assert {ABRouter(1.0).arm(f"k{i}") for i in range(1000)} == {"candidate"}
    assert {ABRouter(1.0).arm(None) for _ in range(100)} == {"candidate"}
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError):
            ABRouter(bad)


def test_ab_without_key_uses_the_injected_rng() -> None:
    router = ABRouter(0.25, rng=random.Random(5))
    arms = [router.arm(None) for _ in range(10_000)]
    reference = random.Random(5)
    assert arms == ["candidate" if reference.random() < 0.25 else "live" for _ in range(10_000)]
    assert abs(arms.count("candidate") / 10_000 - 0.25) < 0.015
    seeded = [ABRouter(0.5, seed=3).arm(None) for _ in range(1)]
    assert seeded == [ABRouter(0.5, seed=3).arm(None)]


def test_ab_router_is_thread_safe() -> None:
    router = ABRouter(0.5, seed=0)

    def route() -> None:
        for i in range(1000):
            router.arm(None if i % 2 else f"k{i}")

    threads = [threading.Thread(target=route) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(router.counts().values()) == 8000


# ------------------------------------------------------------------------------ shadow runner
def test_shadow_counts_agreement_and_latency(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate, step=0.002)
    flipped = 0
    total_rows = 0
    for i in range(10):
        x = batch(8, seed=i)
        live = expected_probs(x)
        # Disagree on some rows: swap the top class with the lowest one.
        for r in range(i % 4):
            row = live[r]
            top, bottom = int(row.argmax()), int(row.argmin())
            row[top], row[bottom] = row[bottom], row[top]
            flipped += 1
        total_rows += 8
        assert shadow.offer({"x": x}, {"probs": live}, 0.005)
    assert shadow.flush(10)
    stats = shadow.stats()
    assert stats["offered"] == stats["sampled"] == stats["compared"] == 10
    assert stats["dropped"] == stats["candidate_errors"] == stats["pending"] == 0
    assert stats["disagree_rows"] == flipped
    assert stats["agree_rows"] == total_rows - flipped
    assert stats["agreement"] == pytest.approx((total_rows - flipped) / total_rows)
    assert stats["max_abs_diff"] > 0.01
    assert stats["candidate_p50_ms"] == pytest.approx(2.0)
    assert stats["candidate_p99_ms"] == pytest.approx(2.0)
    assert stats["live_p50_ms"] == pytest.approx(5.0)
    assert shadow.close(5)


def test_shadow_identical_answers_agree_everywhere(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate)
    x = batch(16, seed=42)
    shadow.offer({"x": x}, {"probs": expected_probs(x)}, 0.001)
    assert shadow.flush(10)
    stats = shadow.stats()
    assert (stats["agree_rows"], stats["disagree_rows"], stats["agreement"]) == (16, 0, 1.0)
    assert stats["max_abs_diff"] < 1e-5
    assert shadow.close(5)


def test_shadow_raw_outputs_compared_with_tolerance(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate, contract=RAW, atol=1e-3)
    x = batch(6, seed=3)
    live = expected_probs(x)
    live[1, 0] += 5e-4  # within tolerance
    live[2, 2] -= 0.05  # beyond it
    live[4] += 0.01  # beyond it, every value
    shadow.offer({"x": x}, {"probs": live}, 0.001)
    assert shadow.flush(10)
    stats = shadow.stats()
    assert (stats["agree_rows"], stats["disagree_rows"]) == (4, 2)
    assert stats["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)
    assert shadow.close(5)


def test_shadow_samples_the_configured_fraction(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate, fraction=0.25, seed=11, queue_size=400)
    x = batch(1, seed=0)
    live = {"probs": expected_probs(x)}
    queued = [shadow.offer({"x": x}, live, 0.001) for _ in range(400)]
    reference = random.Random(11)
    assert queued == [reference.random() < 0.25 for _ in range(400)]
    assert shadow.flush(10)
    stats = shadow.stats()
    assert stats["offered"] == 400
    assert stats["sampled"] == stats["compared"] == sum(queued)
    assert 60 < stats["sampled"] < 140
    assert shadow.close(5)


def test_shadow_full_queue_drops_without_blocking(candidate: OnnxRuntime) -> None:
    slow = Gated(candidate)
    shadow = runner(slow, queue_size=2)
    x = batch(2, seed=1)
    live = {"probs": expected_probs(x)}
    assert shadow.offer({"x": x}, live, 0.001)
    assert slow.entered.wait(10)  # the worker is stuck in the candidate
    assert shadow.offer({"x": x}, live, 0.001)
    assert shadow.offer({"x": x}, live, 0.001)
    for _ in range(5):
        start = time.perf_counter()
        assert not shadow.offer({"x": x}, live, 0.001)
        assert time.perf_counter() - start < 0.05
    stats = shadow.stats()
    assert (stats["sampled"], stats["dropped"], stats["pending"]) == (8, 5, 3)
    slow.gate.set()
    assert shadow.flush(10)
    stats = shadow.stats()
    assert (stats["compared"], stats["agree_rows"], stats["disagree_rows"]) == (3, 6, 0)
    assert shadow.close(5)


def test_shadow_candidate_errors_are_counted_and_the_worker_survives(
    candidate: OnnxRuntime,
) -> None:
    shadow = runner(candidate)
    good = batch(3, seed=5)
    live = {"probs": expected_probs(good)}
    # The real session rejects 5 features where the model takes 4.
    assert shadow.offer({"x": np.zeros((3, 5), np.float32)}, live, 0.001)
    # Answers that cannot be compared: wrong live shape, missing output.
    assert shadow.offer({"x": good}, {"probs": expected_probs(good)[:2]}, 0.001)
    assert shadow.offer({"x": good}, {"other": live["probs"]}, 0.001)
    assert shadow.offer({"x": good}, live, 0.001)
    assert shadow.flush(10)
    stats = shadow.stats()
    assert stats["candidate_errors"] == 3
    assert stats["compared"] == 1
    assert stats["agree_rows"] == 3
    assert stats["last_error"].startswith("_MismatchError")
    assert shadow.running
    assert shadow.close(5)


def test_shadow_inference_error_is_reported(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate)
    shadow.offer({"x": np.zeros((1, 5), np.float32)}, {"probs": np.zeros((1, 3))}, 0.0)
    assert shadow.flush(10)
    assert shadow.stats()["last_error"].startswith(InferenceError.__name__)
    assert shadow.close(5)


def test_shadow_close_joins_the_worker(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate)
    assert shadow.running
    assert shadow.close(5)
    assert not shadow.running
    x = batch(1, seed=0)
    assert not shadow.offer({"x": x}, {"probs": expected_probs(x)}, 0.001)
    assert shadow.close(1)  # idempotent


def test_shadow_close_with_a_busy_worker_and_a_full_queue(candidate: OnnxRuntime) -> None:
    slow = Gated(candidate)
    shadow = runner(slow, queue_size=2)
    x = batch(1, seed=0)
    live = {"probs": expected_probs(x)}
    for _ in range(3):
        shadow.offer({"x": x}, live, 0.001)
    assert slow.entered.wait(10)
    assert not shadow.close(0.05)  # still inside the candidate
    slow.gate.set()
    assert shadow.close(5)
    assert not shadow.running
    assert shadow.stats()["compared"] <= 1  # queued requests are abandoned, not run


def test_shadow_stats_before_any_comparison(candidate: OnnxRuntime) -> None:
    shadow = runner(candidate, fraction=0.0)
    x = batch(1, seed=0)
    assert not shadow.offer({"x": x}, {"probs": expected_probs(x)}, 0.001)
    stats = shadow.stats()
    assert stats["offered"] == 1
    assert stats["sampled"] == 0
    assert stats["agreement"] is None
    assert stats["candidate_p99_ms"] is None
    assert shadow.close(5)


@pytest.mark.parametrize(
    ("kwargs"),
    [{"fraction": 1.5}, {"queue_size": 0}, {"atol": -1.0}, {"latency_window": 0}],
)
def test_shadow_rejects_bad_settings(candidate: OnnxRuntime, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        runner(candidate, **kwargs)  # type: ignore[arg-type]


class FixedRuntime:
    """A fake candidate returning a fixed answer, for shapes a tiny real model cannot make."""

    name, version, inputs, outputs = "fake", "0", (), ()

    def __init__(self, answer: dict[str, Tensor]) -> None:
        self.answer = answer

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.answer

    def close(self) -> None:
        pass


def test_shadow_binary_single_column_and_nan() -> None:
    binary = OutputContract(
        task="classification", outputs=("p",), labels=("neg", "pos"), score_output="p"
    )
    cand = np.asarray([[0.9], [0.2], [0.6]], np.float32)
    shadow = runner(FixedRuntime({"p": cand}), contract=binary)
    shadow.offer({}, {"p": np.asarray([[0.7], [0.1], [0.4]], np.float32)}, 0.001)
    assert shadow.flush(10)
    assert (shadow.stats()["agree_rows"], shadow.stats()["disagree_rows"]) == (2, 1)
    assert shadow.close(5)

    raw = OutputContract(task="regression", outputs=("y",))
    y = np.asarray([1.0, np.nan, 3.0], np.float32)
    shadow = runner(FixedRuntime({"y": y}), contract=raw)
    shadow.offer({}, {"y": np.asarray([1.0, np.nan, np.nan], np.float32)}, 0.001)
    assert shadow.flush(10)
    assert (shadow.stats()["agree_rows"], shadow.stats()["disagree_rows"]) == (2, 1)
    assert shadow.close(5)
