"""Adaptive batching (``edge_agent.runtime.batching``): concurrent requests run as one batch and
each gets exactly its own rows back; failures stay with their request; a lone client never
waits; ``auto`` turns it on only where it pays.

Queueing is made deterministic by a runtime whose first run blocks until the test has queued
the requests it wants batched (no sleeps, no timing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.config import ModelPolicy
from edge_agent.errors import ConfigError, InferenceError
from edge_agent.runtime.base import RuntimeOptions, Tensor, TensorInfo
from edge_agent.runtime.batching import (
    MIN_SAVING_S,
    PROBE_ROWS,
    BatchGain,
    BatchingRuntime,
    batch_gain,
    batchable,
    decide,
    with_batching,
)
from edge_agent.runtime.onnx import OnnxRuntime
from support import wait_until


class FakeRuntime:
    """Doubles each row's sum (``y``) and echoes the rows (``x``); NaN rows fail the whole call.

    The first run blocks on ``release`` once ``gate`` is set, so the test can queue requests
    behind it."""

    name = "fake"
    version = "1"

    def __init__(self, *, gate: bool = True, scalar_output: bool = False) -> None:
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._gate = gate
        self._scalar = scalar_output
        self.cost: Callable[[int], None] | None = None

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return (TensorInfo("x", "float32", (None, 3)),)

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return (TensorInfo("y", "float32", (None,)),)

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = np.asarray(feeds["x"])
        self.calls.append(int(x.shape[0]))
        if self._gate:
            self._gate = False
            self.entered.set()
            assert self.release.wait(30)
        if self.cost is not None:
            self.cost(int(x.shape[0]))
        if np.isnan(x).any():
            raise InferenceError("NaN in the input")
        if self._scalar:
            return {"y": np.asarray(x.sum(), dtype=np.float32)}
        return {"y": x.sum(axis=tuple(range(1, x.ndim))) * 2, "x": x}

    def close(self) -> None:
        pass


def _rows(n: int, start: float, width: int = 3) -> Tensor:
    return (np.arange(n * width, dtype=np.float32).reshape(n, width) + start).astype(np.float32)


class Clients:
    """Requests on their own threads; their answers (or errors) by index."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.results: dict[int, dict[str, Tensor] | Exception] = {}
        self.threads: list[threading.Thread] = []

    def send(self, i: int, feeds: dict[str, Tensor]) -> None:
        def go() -> None:
            try:
                self.results[i] = self.runtime.run(feeds)
            except Exception as exc:
                self.results[i] = exc

        t = threading.Thread(target=go)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        for t in self.threads:
            t.join(30)
            assert not t.is_alive()


def _queued(b: BatchingRuntime) -> int:
    with b._cond:
        return len(b._queue)


def _hold_first(b: BatchingRuntime, inner: FakeRuntime, clients: Clients) -> None:
    """Request 0 (one row) leads and blocks inside the runtime."""
    clients.send(0, {"x": _rows(1, 1000)})
    assert inner.entered.wait(30)


def test_concurrent_requests_run_as_one_batch_and_each_gets_its_rows() -> None:
    inner = FakeRuntime()
    b = BatchingRuntime(inner, max_rows=64)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    feeds = {i: {"x": _rows(i, 10.0 * i)} for i in range(1, 6)}
    for i, f in feeds.items():
        clients.send(i, f)
    wait_until(lambda: _queued(b) == 5, timeout=30, what="five requests queued")
    inner.release.set()
    clients.join()
    assert inner.calls == [1, 15]  # the held request alone, then 1+2+3+4+5 rows at once
    for i, f in feeds.items():
        out = clients.results[i]
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["x"], f["x"])
        np.testing.assert_array_equal(out["y"], f["x"].sum(axis=1) * 2)
    assert b.stats.batches == 2
    assert b.stats.requests == 6
    assert b.stats.rows == 16


def test_a_batch_never_exceeds_max_rows_and_keeps_arrival_order() -> None:
    inner = FakeRuntime()
    b = BatchingRuntime(inner, max_rows=64)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    for i in range(1, 6):
        clients.send(i, {"x": _rows(30, 100.0 * i)})
        wait_until(lambda i=i: _queued(b) == i, timeout=30, what=f"request {i} queued")
    inner.release.set()
    clients.join()
    assert inner.calls == [1, 60, 60, 30]
    for i in range(1, 6):
        out = clients.results[i]
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["x"], _rows(30, 100.0 * i))


def test_requests_of_different_shapes_are_never_mixed() -> None:
    inner = FakeRuntime()
    b = BatchingRuntime(inner, max_rows=64)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    feeds = {
        1: {"x": _rows(2, 0)},
        2: {"x": _rows(2, 50, width=4)},
        3: {"x": _rows(3, 100)},
        4: {"x": _rows(1, 200, width=4)},
        5: {"x": _rows(2, 300).astype(np.float64)},
    }
    for i, f in feeds.items():
        clients.send(i, f)
        wait_until(lambda i=i: _queued(b) == i, timeout=30, what=f"request {i} queued")
    inner.release.set()
    clients.join()
    assert inner.calls == [1, 5, 3, 2]  # (3 wide: 2+3), (4 wide: 2+1), float64 alone
    for i, f in feeds.items():
        out = clients.results[i]
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["x"], f["x"])


def test_a_failing_request_fails_alone_and_the_rest_of_its_batch_is_answered() -> None:
    inner = FakeRuntime()
    b = BatchingRuntime(inner, max_rows=64)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    bad = _rows(2, 0)
    bad[1, 1] = np.nan
    feeds = {1: {"x": _rows(2, 10)}, 2: {"x": bad}, 3: {"x": _rows(1, 20)}}
    for i, f in feeds.items():
        clients.send(i, f)
    wait_until(lambda: _queued(b) == 3, timeout=30, what="three requests queued")
    inner.release.set()
    clients.join()
    assert isinstance(clients.results[2], InferenceError)
    for i in (1, 3):
        out = clients.results[i]
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["x"], feeds[i]["x"])
    assert inner.calls == [1, 5, 2, 2, 1]  # the batch failed, then each ran alone
    assert b.stats.reruns == 1


def test_outputs_without_the_batch_dimension_stop_batching_and_answers_stay_right() -> None:
    inner = FakeRuntime(scalar_output=True)
    b = BatchingRuntime(inner, max_rows=64)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    feeds = {1: {"x": _rows(2, 10)}, 2: {"x": _rows(3, 20)}}
    for i, f in feeds.items():
        clients.send(i, f)
    wait_until(lambda: _queued(b) == 2, timeout=30, what="two requests queued")
    inner.release.set()
    clients.join()
    assert b.disabled is not None
    assert "batch dimension" in b.disabled
    for i, f in feeds.items():
        out = clients.results[i]
        assert isinstance(out, dict)
        assert float(out["y"]) == pytest.approx(float(f["x"].sum()))
    calls = len(inner.calls)
    b.run({"x": _rows(2, 0)})
    assert inner.calls[calls:] == [2]  # from now on every request runs alone
    assert b.stats.alone == 1


def test_a_lone_client_never_waits_for_company() -> None:
    ticks = 0

    def clock() -> float:
        nonlocal ticks
        ticks += 1
        return 0.0

    inner = FakeRuntime(gate=False)
    b = BatchingRuntime(inner, max_rows=64, max_delay_s=30.0, clock=clock)
    for i in range(10):
        out = b.run({"x": _rows(1, i)})
        np.testing.assert_array_equal(out["x"], _rows(1, i))
    assert ticks == 0  # never looked at the clock: never waited
    assert inner.calls == [1] * 10


def test_under_concurrency_a_leader_waits_up_to_the_budget_for_more_rows() -> None:
    inner = FakeRuntime()
    b = BatchingRuntime(inner, max_rows=4, max_delay_s=30.0)
    clients = Clients(b)
    _hold_first(b, inner, clients)
    clients.send(1, {"x": _rows(1, 1)})
    clients.send(2, {"x": _rows(1, 2)})
    wait_until(lambda: _queued(b) == 2, timeout=30, what="two requests queued")
    inner.release.set()
    wait_until(lambda: len(inner.calls) == 2, timeout=30, what="the batch of two ran")
    # The last batch held two requests: the next leader waits (up to 30 s) for 4 rows.
    for i in range(3, 7):
        clients.send(i, {"x": _rows(1, i)})
    clients.join()
    assert inner.calls == [1, 2, 4]


def test_requests_larger_than_a_batch_run_alone_at_once() -> None:
    inner = FakeRuntime(gate=False)
    b = BatchingRuntime(inner, max_rows=8)
    out = b.run({"x": _rows(8, 0)})
    np.testing.assert_array_equal(out["x"], _rows(8, 0))
    assert b.stats.alone == 1
    assert b.stats.batches == 0


def _mlp_onnx(width: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, width)).astype(np.float32)
    w2 = rng.normal(size=(width, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["p"], axis=1),
            helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
            helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Held:
    """A real runtime whose first run waits for ``release`` (to queue requests behind it)."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        self.name, self.version = inner.name, inner.version
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.calls.append(int(next(iter(feeds.values())).shape[0]))
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


def test_onnxruntime_answers_in_a_batch_equal_the_answers_alone() -> None:
    model = OnnxRuntime(_mlp_onnx(), RuntimeOptions())
    held = Held(model)
    b = BatchingRuntime(held, max_rows=256)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    feeds = {i: {"x": rng.normal(size=(1 + i % 4, 8)).astype(np.float32)} for i in range(33)}
    clients = Clients(b)
    clients.send(0, feeds[0])
    assert held.entered.wait(30)
    for i in range(1, 33):
        clients.send(i, feeds[i])
    wait_until(lambda: _queued(b) == 32, timeout=30, what="32 requests queued")
    held.release.set()
    clients.join()
    assert held.calls[1] == sum(f["x"].shape[0] for i, f in feeds.items() if i > 0)
    for i, f in feeds.items():
        out = clients.results[i]
        assert isinstance(out, dict), out
        alone = model.run(f)
        np.testing.assert_allclose(out["p"], alone["p"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["label"], alone["label"])


def test_batchable_and_with_batching_off_and_on() -> None:
    fixed = TensorInfo("x", "float32", (1, 8))
    assert "fixed first dimension" in str(batchable((fixed,)))
    assert "scalar" in str(batchable((TensorInfo("x", "float32", ()),)))
    assert batchable((TensorInfo("x", "float32", ("batch", 8)),)) is None
    model = OnnxRuntime(_mlp_onnx(), RuntimeOptions())
    same, why = with_batching(model, "off", max_rows=64, max_delay_s=0)
    assert same is model
    assert why == "batching off"
    wrapped, why = with_batching(model, "on", max_rows=64, max_delay_s=0.002)
    assert isinstance(wrapped, BatchingRuntime)
    assert wrapped.max_delay_s == 0.002
    assert why == "batching on"


@pytest.mark.parametrize(
    ("alone_us", "batched_us", "pays"),
    [
        (200.0, 10.0, True),  # a big model: batching saves 190 us a row
        (6.0, 0.3, False),  # a tiny model: 20x cheaper per row, but saves < 50 us
        (200.0, 150.0, False),  # a batch barely helps
        (200.0, 100.0, True),  # exactly half: pays
    ],
)
def test_decide(alone_us: float, batched_us: float, pays: bool) -> None:
    assert (decide(BatchGain(alone_us * 1e-6, batched_us * 1e-6)) is None) is pays


def test_auto_probes_the_model_on_a_clock_and_decides() -> None:
    """``batch_gain`` on a fake clock that a run advances by its cost: 200 us a call plus 2 us
    a row pays (5.1 us a row in a batch of 64); 5 us a call plus 0.1 us a row is 29x cheaper
    per row in a batch but saves only 4.9 us a row: it does not."""
    now = 0.0

    def clock() -> float:
        return now

    def costs(per_call: float, per_row: float) -> Callable[[int], None]:
        def cost(rows: int) -> None:
            nonlocal now
            now += per_call + per_row * rows

        return cost

    inner = FakeRuntime(gate=False)
    inner.cost = costs(200e-6, 2e-6)
    gain = batch_gain(inner, clock=clock)
    assert isinstance(gain, BatchGain)
    assert gain.alone_s == pytest.approx(202e-6)
    assert gain.batched_s == pytest.approx((200e-6 + 2e-6 * PROBE_ROWS) / PROBE_ROWS)
    assert decide(gain) is None
    inner.cost = costs(5e-6, 0.1e-6)
    gain = batch_gain(inner, clock=clock)
    assert isinstance(gain, BatchGain)
    assert gain.ratio < 0.05
    assert gain.alone_s - gain.batched_s < MIN_SAVING_S
    assert "saves" in str(decide(gain))


def test_auto_keeps_a_model_that_cannot_be_probed_unbatched() -> None:
    class Dynamic(FakeRuntime):
        @property
        def inputs(self) -> tuple[TensorInfo, ...]:
            return (TensorInfo("x", "float32", (None, None)),)

    inner = Dynamic(gate=False)
    runtime, why = with_batching(inner, "auto", max_rows=64, max_delay_s=0)
    assert runtime is inner
    assert "dynamic dimension past the first" in why


@pytest.mark.parametrize(
    "fields",
    [
        {"batching": "maybe"},
        {"batching": ""},
        {"batch_max_rows": 1},
        {"batch_max_rows": 4097},
        {"batch_max_delay_ms": -1.0},
        {"batch_max_delay_ms": 100.5},
    ],
)
def test_hostile_batching_policies_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ModelPolicy(**fields).validate()


def test_valid_batching_policies() -> None:
    for mode in ("off", "on", "auto"):
        ModelPolicy(batching=mode, batch_max_rows=2, batch_max_delay_ms=0).validate()
    assert ModelPolicy().batching == "off"


@pytest.mark.parametrize("max_delay_s", [0.0, 0.0005])
def test_many_threads_random_sizes_and_failures_every_answer_is_its_own(
    max_delay_s: float,
) -> None:
    """16 threads x 40 requests of 1-40 rows, two widths, one in 10 failing: every request
    gets exactly its own rows or its own error, and nobody is left waiting."""
    inner = FakeRuntime(gate=False)
    b = BatchingRuntime(inner, max_rows=64, max_delay_s=max_delay_s)
    wrong: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for k in range(40):
            rows, width = int(rng.integers(1, 41)), int(rng.choice([3, 5]))
            x = rng.normal(size=(rows, width)).astype(np.float32)
            fail = rng.random() < 0.1
            if fail:
                x[rows - 1, 0] = np.nan
            try:
                out = b.run({"x": x})
            except InferenceError:
                if not fail:
                    wrong.append(f"{seed}/{k}: failed")
                continue
            if fail:
                wrong.append(f"{seed}/{k}: answered a NaN request")
            elif not np.array_equal(out["x"], x):
                wrong.append(f"{seed}/{k}: someone else's rows")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a request was left waiting"
    assert wrong == []
    assert b.stats.requests + b.stats.alone == 16 * 40
    assert max(inner.calls) <= 64
