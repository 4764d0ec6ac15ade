"""Latency and throughput of a loaded model, and its size: the numbers in build reports and bench.

Owns: warm-up, bounded repeated timing with ``time.perf_counter`` (median of single runs), and
building batch-1 / batch-64 feeds from preprocessed samples. Does not own: loading models
(callers pass a ``Runtime`` with the thread settings they want to compare) or any verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.runtime.base import Runtime
from model_builder.errors import InputDataError

Array = npt.NDArray[Any]
Clock = Callable[[], float]


@dataclass(frozen=True)
class LatencyStats:
    """Timing of one batch size: median and 90th percentile of single ``run`` calls."""

    batch: int
    runs: int
    median_ms: float
    p90_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


@dataclass(frozen=True)
class PerfReport:
    """Model size and timing per batch size."""

    size_bytes: int
    latency: tuple[LatencyStats, ...]

    def at(self, batch: int) -> LatencyStats:
        """The stats for ``batch``.

        Raises:
            InputDataError: that batch size was not measured.
        """
        for stats in self.latency:
            if stats.batch == batch:
                return stats
        raise InputDataError(f"batch size {batch} was not measured")

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "latency": [{**asdict(s), "throughput": s.throughput} for s in self.latency],
        }


def tile_batch(x: Array, batch: int) -> Array:
    """The first ``batch`` samples of ``x``, repeating them when ``x`` has fewer.

    Raises:
        InputDataError: ``x`` holds no samples or ``batch`` is below 1.
    """
    if len(x) == 0 or batch < 1:
        raise InputDataError("need at least one sample and a batch size of at least 1")
    reps = -(-batch // len(x))
    return np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch]


def measure_latency(
    runtime: Runtime,
    feeds: Mapping[str, Array],
    *,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    max_seconds: float = 2.0,
    clock: Clock = time.perf_counter,
) -> LatencyStats:
    """Time ``runtime.run(feeds)`` after ``warmup`` untimed runs.

    Stops after ``max_runs`` runs, or once ``max_seconds`` have passed and at least ``min_runs``
    runs were timed, so slow models stay bounded in time and fast ones in count.

    Raises:
        InputDataError: bad bounds.
        InferenceError: the runtime failed.
    """
    if min_runs < 1 or max_runs < min_runs or max_seconds <= 0:
        raise InputDataError("latency bounds need 1 <= min_runs <= max_runs and max_seconds > 0")
    for _ in range(warmup):
        runtime.run(feeds)
    times: list[float] = []
    start = clock()
    while len(times) < max_runs and (len(times) < min_runs or clock() - start < max_seconds):
        t0 = clock()
        runtime.run(feeds)
        times.append(clock() - t0)
    ms = np.asarray(times) * 1000.0
    batch = len(next(iter(feeds.values())))
    return LatencyStats(batch, len(times), float(np.median(ms)), float(np.percentile(ms, 90)))


def measure_perf(
    runtime: Runtime,
    samples: Mapping[str, Array],
    size_bytes: int,
    *,
    batches: Sequence[int] = (1, 64),
    **bounds: Any,
) -> PerfReport:
    """Latency at each batch size, feeding preprocessed ``samples`` tiled to that size.

    ``bounds`` are passed to :func:`measure_latency` (warmup, min_runs, max_runs, max_seconds).

    Raises:
        InputDataError: no samples or bad bounds.
        InferenceError: the runtime failed.
    """
    stats = tuple(
        measure_latency(runtime, {k: tile_batch(v, b) for k, v in samples.items()}, **bounds)
        for b in batches
    )
    return PerfReport(size_bytes, stats)
