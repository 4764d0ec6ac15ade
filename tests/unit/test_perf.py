"""Latency measurement: bounded in runs and time, medians from the clock it is given."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.runtime.onnx import OnnxRuntime
from model_builder.errors import InputDataError
from model_builder.evaluate.perf import measure_latency, measure_perf, tile_batch


class _FakeRuntime:
    """Counts runs; each run advances the fake clock by the next duration."""

    def __init__(self, clock: list[float], durations: list[float]) -> None:
        self.clock, self.durations, self.runs = clock, durations, 0

    def run(self, feeds):
        self.clock[0] += self.durations[self.runs % len(self.durations)]
        self.runs += 1
        return {}


def _clock(state: list[float]):
    return lambda: state[0]


def test_median_and_p90_come_from_single_runs():
    state = [0.0]
    rt = _FakeRuntime(state, [0.001, 0.003, 0.002])
    stats = measure_latency(
        rt, {"x": np.zeros((4, 2))}, warmup=0, min_runs=3, max_runs=3, clock=_clock(state)
    )
    assert stats.runs == 3
    assert stats.batch == 4
    assert stats.median_ms == pytest.approx(2.0)
    assert stats.throughput == pytest.approx(4 * 1000 / 2.0)


def test_run_count_is_bounded_for_fast_models():
    state = [0.0]
    rt = _FakeRuntime(state, [1e-6])
    stats = measure_latency(rt, {"x": np.zeros((1, 2))}, warmup=2, max_runs=50, clock=_clock(state))
    assert stats.runs == 50
    assert rt.runs == 52


def test_time_is_bounded_for_slow_models():
    state = [0.0]
    rt = _FakeRuntime(state, [1.0])  # one second per run
    stats = measure_latency(
        rt,
        {"x": np.zeros((1, 2))},
        warmup=0,
        min_runs=3,
        max_runs=100,
        max_seconds=2.0,
        clock=_clock(state),
    )
    assert stats.runs == 3  # min_runs wins over the time budget, then it stops


@pytest.mark.parametrize(
    "kw", [{"min_runs": 0}, {"max_runs": 1, "min_runs": 2}, {"max_seconds": 0}]
)
def test_bad_bounds(kw):
    with pytest.raises(InputDataError):
        measure_latency(_FakeRuntime([0.0], [0.1]), {"x": np.zeros((1, 1))}, **kw)


def test_tile_batch():
    x = np.arange(3).reshape(3, 1)
    assert tile_batch(x, 2).ravel().tolist() == [0, 1]
    assert tile_batch(x, 7).ravel().tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(InputDataError):
        tile_batch(x[:0], 4)


def test_measure_perf_on_a_real_model(digits_mlp):
    rt = OnnxRuntime(digits_mlp.model_bytes)
    feeds = {"input": digits_mlp.preprocessing.apply(digits_mlp.x_eval[:10])}
    report = measure_perf(rt, feeds, len(digits_mlp.model_bytes), max_runs=5, max_seconds=0.1)
    assert [s.batch for s in report.latency] == [1, 64]
    assert report.at(64).runs >= 5
    assert report.at(64).median_ms > 0
    assert report.to_dict()["size_bytes"] == len(digits_mlp.model_bytes)
    with pytest.raises(InputDataError):
        report.at(8)
